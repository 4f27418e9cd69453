"""Step time of `compile: true` against eager, the same model and batch, in one run.

    python -m tools.bench_compile [--presets tiny small] [--batch 2] [--seq 256] [--iters 7]
                                  [--backend inductor] [--device cpu|cuda] [--precision fp32|bf16]

For each preset two copies of the same megads model (same seed) are built, one with its blocks
compiled (`megads.parallel.compile.apply_compile`, what `compile: true` does); each iteration
runs loss (MTP on) + backward on the same batch, alternating the two models to share machine
noise. Reported: the first compiled step (compilation included), median seconds per step after
`--warmup` steps, the ratio compiled / eager, and the loss of both (equal within float32
rounding). On a loaded machine only the ratio means much.
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
          precision: str) -> dict[str, float]:
    cfg = load_preset(preset)
    dev = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else None
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        m = DeepseekV3(cfg).to(dev).train()
        if name == "compiled":
            apply_compile(m, backend=backend)
        models[name] = m
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    t0 = time.perf_counter()
    loss_c = _step(models["compiled"], x, y, dtype=dtype)
    first_s = time.perf_counter() - t0
    loss_e = _step(models["eager"], x, y, dtype=dtype)
    for _ in range(warmup):
        for m in models.values():
            _step(m, x, y, dtype=dtype)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for i in range(iters):
        for name in (("eager", "compiled") if i % 2 == 0 else ("compiled", "eager")):
            t0 = time.perf_counter()
            _step(models[name], x, y, dtype=dtype)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"eager_s": med["eager"], "compiled_s": med["compiled"], "ratio": med["compiled"] / med["eager"],
            "first_compiled_step_s": first_s, "loss_eager": loss_e, "loss_compiled": loss_c,
            "tokens_per_s_eager": batch * seq / med["eager"], "tokens_per_s_compiled": batch * seq / med["compiled"]}


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
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}", flush=True)
    for preset in args.presets:
        r = bench(preset, batch=args.batch, seq=args.seq, iters=args.iters, warmup=args.warmup,
                  backend=args.backend, device=args.device, precision=args.precision)
        print(f"{preset} {args.precision} {args.batch}x{args.seq}: eager {r['eager_s'] * 1e3:.1f} ms, compiled "
              f"({args.backend}) {r['compiled_s'] * 1e3:.1f} ms per step (median of {args.iters}): compiled / eager "
              f"= {r['ratio']:.3f}; first compiled step {r['first_compiled_step_s']:.1f} s; loss eager "
              f"{r['loss_eager']:.6f}, compiled {r['loss_compiled']:.6f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
