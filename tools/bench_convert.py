"""Peak memory and speed of the streaming converters against the checkpoint size.

    python -m tools.bench_convert [--cases small wide wide-ep1] [--workdir DIR] [--keep]

Each case builds a random bf16 HF checkpoint (megads' `to_hf` of a random model), then runs, each
in a fresh interpreter (`--child`), `megads-convert from-hf` (HF -> megads checkpoint folder) and
`to-hf` (back, at one or two shard sizes), and checks the round trip is bit-identical. A child
reports its wall time and peak resident set (VmHWM of /proc/self/status, which starts afresh at
exec; the child's ru_maxrss would also count the forking parent's pages before the exec).
Baseline: a child that only imports what the converters
import (torch, safetensors, tqdm, megads.convert) -- the interpreter's own floor.

    small      conf/model/small.yaml (8192 vocabulary, 12 layers, 32 experts)
    wide       a ~3.7 GB synthetic model: hidden 2048, 64 experts of width 1024, 4 layers + MTP
    wide-ep1   the same weights stored as a trainer with ep=1 stores them (each expert stack one
               chunk, written by a bench helper, not by megads-convert): to-hf then reads a
               whole [E, 2I, D] stack at once

Columns: size = bytes of tensors in the source checkpoint; largest tensor = largest tensor under
our names (an [E, 2I, D] expert stack); largest chunk = largest DCP chunk (what is built, or
read, at once: from-hf writes one chunk per expert, so its largest is a non-expert tensor);
bound = largest tensor + shard + baseline, the limit issue 11 sets (to-hf never holds a shard).
Measured, beyond the baseline: from-hf about 2x the largest chunk (torch.save into DCP's file
stream copies each record once more), to-hf about 3x (DCP's reader torch.loads the chunk from
the stream, then copies the box out of it).
Files are read back right after being written: the page cache is warm, so MB/s is CPU-bound
(hashing, torch.save / torch.load framing), not disk-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
MiB = 1024**2


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


# ----------------------------------------------------------------------------------- children
def _child(argv: list[str]) -> None:
    """One measured action in this (fresh) process, timed after the imports; prints a JSON line."""
    import safetensors  # noqa: F401
    import torch  # noqa: F401
    import tqdm  # noqa: F401

    import megads.convert.checkpoint  # noqa: F401
    from megads.convert.cli import main

    t0 = time.perf_counter()
    if argv[0] == "whole-stacks":
        _write_whole_stacks(Path(argv[1]), Path(argv[2]))
    elif argv[0] != "baseline":
        if main([*argv, "--no-progress"]) != 0:
            raise SystemExit(2)
    print(json.dumps({"seconds": time.perf_counter() - t0, "hwm": _hwm_bytes()}))


def _write_whole_stacks(hf: Path, dst: Path) -> None:
    """A checkpoint folder of `hf` with each expert stack stored as one chunk (ep=1 trainer layout)."""
    import dataclasses

    import torch

    from megads.checkpoint.dcp import MODEL_PREFIX, commit_folder
    from megads.checkpoint.lazy import LazyTensor, save_lazy
    from megads.convert.hf import HFCheckpoint, is_expert_tensor, model_shapes, read_hf_config

    cfg = read_hf_config(hf)
    ckpt = HFCheckpoint(hf, cfg)
    state = {}
    for ours, shape in model_shapes(cfg).items():
        dtype = ckpt.stored_dtype(ours)
        experts = (0, shape[0]) if is_expert_tensor(ours) else None

        def produce(offsets, sizes, ours=ours, dtype=dtype, experts=experts):
            out = torch.empty(sizes, dtype=dtype)
            ckpt.fill(ours, out, experts=experts)
            return out

        state[MODEL_PREFIX + ours] = LazyTensor(shape, dtype, produce)
    tmp = dst.with_name(dst.name + ".tmp")
    save_lazy(tmp, state)
    commit_folder(tmp, dst, meta={"step": 0, "weights_only": True, "model": dataclasses.asdict(cfg)})


def _run_child(*argv: str) -> dict[str, float]:
    """Run `_child(argv)` in a fresh interpreter; its JSON line."""
    proc = subprocess.run([sys.executable, "-m", "tools.bench_convert", "--child", *argv], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- cases
def _wide_config():
    from megads.model.config import ModelConfig

    return ModelConfig(
        vocab_size=32768, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=16, n_shared_experts=1, n_routed_experts=64, kv_lora_rank=512, q_lora_rank=1024,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4,
        num_experts_per_tok=8, first_k_dense_replace=1, max_position_embeddings=4096, num_nextn_predict_layers=1,
    )


def _make_hf(case: str, dst: Path, *, shard_bytes: int) -> None:
    """A random bf16 HF checkpoint: megads' to_hf of a random model (built on meta, filled in place)."""
    import torch

    from megads.convert.hf import to_hf
    from megads.model.rope import RotaryEmbedding
    from megads.model.transformer import DeepseekV3
    from tools.count_params import load_preset

    cfg = load_preset("small") if case == "small" else _wide_config()
    with torch.device("meta"):
        model = DeepseekV3(cfg, init_seed=0)
    model.to(torch.bfloat16)
    model.to_empty(device="cpu")
    model.rotary = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("norm.weight") or "layernorm" in name:
                t.fill_(1.0)
            elif "e_score_correction_bias" in name:
                t.uniform_(-0.1, 0.1, generator=g)
            else:
                t.normal_(0.0, 0.02, generator=g)
    to_hf(model, dst, max_shard_bytes=shard_bytes)


def _sizes_hf(folder: Path) -> tuple[int, int]:
    """(total tensor bytes, largest tensor bytes) of a HF folder, from its headers."""
    from megads.convert.hf import hf_tensor_infos

    infos = hf_tensor_infos(folder)
    return sum(i.nbytes for i in infos.values()), max(i.nbytes for i in infos.values())


def _sizes_dcp(folder: Path) -> tuple[int, int, int]:
    """(total tensor bytes, largest tensor bytes, largest chunk bytes) of a checkpoint folder."""
    import math

    from megads.checkpoint.dcp import saved_keys

    total = largest = chunk = 0
    for md in saved_keys(folder).values():
        if not hasattr(md, "size"):
            continue
        item = md.properties.dtype.itemsize
        n = math.prod(md.size) * item
        total += n
        largest = max(largest, n)
        chunk = max(chunk, *(math.prod(c.sizes) * item for c in md.chunks))
    return total, largest, chunk


def _same_tensors(a: Path, b: Path) -> bool:
    import torch

    from megads.convert.hf import hf_tensor_infos
    from megads.convert.safetensors_io import read

    ia, ib = hf_tensor_infos(a), hf_tensor_infos(b)
    if ia.keys() != ib.keys():
        return False
    for name, info in ia.items():
        x, y = read(info), read(ib[name])
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.view(-1).view(torch.uint8),
                                                                       y.view(-1).view(torch.uint8)):
            return False
    return True


@dataclass
class Row:
    case: str
    step: str
    size: int
    largest: int
    chunk: int
    shard: int | None
    hwm: int
    seconds: float
    baseline: int

    def cells(self) -> list[str]:
        shard = self.shard or 0
        bound = self.largest + shard + self.baseline
        return [
            self.case, self.step, f"{self.size / MiB:,.0f} MiB", f"{self.largest / MiB:,.1f} MiB",
            f"{self.chunk / MiB:,.1f} MiB", "-" if self.shard is None else f"{self.shard / GiB:g} GiB",
            f"{self.hwm / MiB:,.0f} MiB", f"{(self.hwm - self.baseline) / MiB:,.0f} MiB",
            f"{(self.hwm - self.baseline) / self.chunk:.1f}", f"{self.hwm / self.size:.2f}", f"{bound / MiB:,.0f} MiB", f"{self.seconds:.1f} s",
            f"{self.size / MiB / self.seconds:,.0f}",
        ]


HEADER = ["case", "step", "size", "largest tensor", "largest chunk", "shard", "peak RSS", "RSS - baseline",
          "(RSS - baseline) / chunk", "RSS/size", "bound", "time", "MB/s"]


def _bench_case(case: str, work: Path, baseline: int) -> list[Row]:
    rows: list[Row] = []
    hf = work / f"{case.removesuffix('-ep1')}_hf"
    if not hf.exists():
        t0 = time.perf_counter()
        _make_hf(case.removesuffix("-ep1"), hf, shard_bytes=GiB)
        print(f"  built {hf} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    hf_size, _ = _sizes_hf(hf)
    dcp = work / f"{case}_dcp"
    shutil.rmtree(dcp, ignore_errors=True)
    if case.endswith("-ep1"):
        r = _run_child("whole-stacks", str(hf), str(dcp))
        step = "whole-stack writer (bench helper)"
    else:
        r = _run_child("from-hf", str(hf), str(dcp))
        step = "from-hf"
    d_size, d_largest, d_chunk = _sizes_dcp(dcp)
    rows.append(Row(case, step, hf_size, d_largest, d_chunk, None, r["hwm"],
                    r["seconds"], baseline))
    shards = [5 * GiB] if case == "small" else [GiB, 5 * GiB]
    for shard in shards:
        back = work / f"{case}_back"
        shutil.rmtree(back, ignore_errors=True)
        r = _run_child("to-hf", str(dcp), str(back), "--max-shard-gb", f"{shard / GiB:g}")
        if not _same_tensors(hf, back):
            raise RuntimeError(f"{case}: HF -> checkpoint -> HF is not bit-identical")
        rows.append(Row(case, "to-hf", d_size, d_largest, d_chunk, shard, r["hwm"], r["seconds"],
                        baseline))
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["small", "wide", "wide-ep1"],
                        choices=["small", "wide", "wide-ep1"])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base = _run_child("baseline")
        print(f"baseline (import torch, safetensors, tqdm, megads.convert): {base['hwm'] / MiB:.0f} MiB",
              file=sys.stderr)
        rows = []
        for case in args.cases:
            print(f"case {case} ...", file=sys.stderr)
            rows += _bench_case(case, work, int(base["hwm"]))
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    import torch

    print(f"# {time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, Python {platform.python_version()}")
    print(f"# baseline interpreter (imports only): {base['hwm'] / MiB:.0f} MiB; bound = largest tensor + shard + baseline")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print("# every round trip bit-identical (HF -> checkpoint -> HF)")


if __name__ == "__main__":
    main()
