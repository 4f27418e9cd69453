"""Peak memory and time of one forward+backward at long sequence lengths, per memory setting.

    .venv/bin/python -m tools.bench_long_context [--presets tiny small] [--lengths 2048 8192 32768]
        [--modes none/whole selective/chunked full/chunked ...] [--chunk 1024] [--threads 2]

Each point runs in a fresh interpreter (`--child`): it builds the preset's model (float32, CPU,
MTP on, YaRN off), one sequence of T random tokens, sets `memory.recompute` and
`memory.loss_chunk_tokens` (a mode is `<recompute>/<whole|chunked>`), runs one warm-up
`compute_loss` + backward, drops the gradients, resets the kernel's high-water mark of its
resident set (`/proc/self/clear_refs`), runs one more, and reports the new high-water mark minus the resident set just before: the step's peak
memory above the model (activations, autograd's saved tensors, the logits; and the float32
gradients, 4 bytes per parameter, the same for every mode), and the wall time of that second step. Large blocks come from mmap
(`MALLOC_MMAP_THRESHOLD_`), so freed tensors leave the resident set and the mark follows the live
tensors rather than glibc's cached heap. Peer: the `none/whole` point of the same preset and length, in the same run.
Growth with T: peak(T) / peak(T/4) for each mode (4 = linear, 16 = quadratic).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODES = ("none/whole", "none/chunked", "selective/chunked", "full/chunked")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(preset: str, T: int, mode: str, chunk: int, threads: int) -> dict[str, float]:
    import torch

    from megads.model.recompute import apply_recompute
    from megads.model.transformer import DeepseekV3
    from tools.count_params import load_preset

    torch.set_num_threads(threads)
    recompute, loss = mode.split("/")
    cfg = load_preset(preset).replace(max_position_embeddings=max(T, 4096))
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.loss_chunk_tokens = chunk if loss == "chunked" else 0
    apply_recompute(model, recompute)
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=torch.Generator().manual_seed(1))

    def step() -> torch.Tensor:
        out = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.3)
        out.total.backward()
        return out.total.detach()

    step()  # warm-up: one-time allocations (thread pools, kernels' code pages) are not the step's
    model.zero_grad(set_to_none=True)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 32768])
    ap.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES))
    ap.add_argument("--chunk", type=int, default=1024, help="memory.loss_chunk_tokens of the chunked modes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], help="preset:T pairs to leave out (e.g. small:32768)")
    ap.add_argument("--child", nargs=3, metavar=("PRESET", "T", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        preset, T, mode = args.child
        print(json.dumps(child(preset, int(T), mode, args.chunk, args.threads)))
        return 0
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}: "
          f"{os.cpu_count()} CPUs, {args.threads} threads, chunk {args.chunk} tokens, one sequence per step")
    results: dict[tuple[str, int, str], dict[str, float]] = {}
    for preset in args.presets:
        for T in args.lengths:
            if f"{preset}:{T}" in args.skip:
                continue
            for mode in args.modes:
                cmd = [sys.executable, "-m", "tools.bench_long_context", "--chunk", str(args.chunk), "--threads",
                       str(args.threads), "--child", preset, str(T), mode]
                # large blocks straight from mmap: freed memory leaves the resident set at once, so
                # the high-water mark follows the live tensors, not glibc's cached heap
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{preset} T={T} {mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    return 1
                results[(preset, T, mode)] = json.loads(proc.stdout.strip().splitlines()[-1])
                r = results[(preset, T, mode)]
                print(f"  {preset} T={T} {mode}: {r['peak_mib']:.0f} MiB, {r['seconds']:.1f} s", file=sys.stderr)
    print("| preset | T | mode (recompute/loss) | peak above model MiB | vs none/whole | growth vs T/4 | step s |")
    print("|---|---|---|---|---|---|---|")
    for (preset, T, mode), r in results.items():
        peer = results.get((preset, T, "none/whole"))
        prev = results.get((preset, T // 4, mode))
        ratio = f"{r['peak_mib'] / peer['peak_mib']:.2f}" if peer else "-"
        growth = f"{r['peak_mib'] / prev['peak_mib']:.2f}x" if prev else "-"
        print(f"| {preset} | {T} | {mode} | {r['peak_mib']:.0f} | {ratio} | {growth} | {r['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
