"""Step time of `compile: true` against eager, the same model and batch, in one run.

    python -m tools.bench_compile [--presets tiny small] [--batch 2] [--seq 256] [--iters 7]
                                  [--backend inductor] [--device cpu|cuda] [--precision fp32|bf16]

For each preset copies of the same megads model (same seed) are built: eager, and one with its
blocks compiled (`megads.parallel.compile.apply_compile`, what `compile: true` does) per
`--gemms` mode: `eager` = the GEMM layers outside the graphs (what a B/W-split schedule gets),
`graph` = traced into them (one process, 1F1B, interleaved). Each iteration runs loss (MTP on) +
backward on the same batch, rotating through the models to share machine noise. Reported: the
first compiled step (compilation included), median seconds per step after `--warmup` steps, the
ratio compiled / eager, and the losses (equal within float32 rounding). On a loaded machine only
the ratios mean much.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from megads.model.transformer import DeepseekV3
from megads.parallel.compile import apply_compile
from tools.count_params import load_preset


def _step(model: DeepseekV3, x: torch.Tensor, y: torch.Tensor, *, dtype: torch.dtype | None) -> float:
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = model.compute_loss(x, y, mtp_weight=0.3).total
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return float(loss.detach())


def bench(preset: str, *, batch: int, seq: int, iters: int, warmup: int, backend: str, device: str,
          precision: str, gemms: list[str]) -> dict[str, dict[str, float]]:
    cfg = load_preset(preset)
    dev = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    models = {}
    for name in ["eager", *gemms]:
        torch.manual_seed(0)
        m = DeepseekV3(cfg).to(dev).train()
        if name != "eager":
            apply_compile(m, backend=backend, eager_gemms=name == "eager_gemms")
        models[name] = m
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    for name, m in models.items():
        t0 = time.perf_counter()
        out[name]["loss"] = _step(m, x, y, dtype=dtype)
        out[name]["first_step_s"] = time.perf_counter() - t0
    for _ in range(warmup):
        for m in models.values():
            _step(m, x, y, dtype=dtype)
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for i in range(iters):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            _step(models[name], x, y, dtype=dtype)
            times[name].append(time.perf_counter() - t0)
    for name in models:
        med = statistics.median(times[name])
        out[name].update(median_s=med, ratio=med / statistics.median(times["eager"]), tokens_per_s=batch * seq / med)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--gemms", nargs="+", choices=["eager", "graph"], default=["eager", "graph"],
                    help="compiled variants: GEMM layers outside the graphs (B/W-split schedules) or inside")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}", flush=True)
    for preset in args.presets:
        # a fresh Dynamo cache per preset: the blocks of two model sizes share code objects, and
        # their shapes together pass the recompile limit (a single training process holds one)
        torch._dynamo.reset()
        r = bench(preset, batch=args.batch, seq=args.seq, iters=args.iters, warmup=args.warmup,
                  backend=args.backend, device=args.device, precision=args.precision,
                  gemms=[f"{g}_gemms" for g in args.gemms])
        for name, v in r.items():
            label = "eager" if name == "eager" else f"compiled ({args.backend}, GEMMs {name.split('_')[0]})"
            print(f"{preset} {args.precision} {args.batch}x{args.seq} {label}: {v['median_s'] * 1e3:.1f} ms per step "
                  f"(median of {args.iters}), / eager = {v['ratio']:.3f}; first step {v['first_step_s']:.1f} s; "
                  f"loss {v['loss']:.6f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
