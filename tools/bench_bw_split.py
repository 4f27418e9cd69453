"""Cost of the B/W split: B + W against one full backward, with deferred weight gradients and
with the graph walked twice (what megads did before), same run.

    python -m tools.bench_bw_split [--preset small] [--batch 2] [--seq 128] [--iters 5] [--precision fp32|fp8]

One forward of the whole model (no MTP weight: its loss is included) per measurement, then:
- full: `loss.backward()` (input and weight gradients in one walk);
- deferred: B = `autograd.grad(loss, non-GEMM parameters)` inside `deferring(all GEMM layers)`
  (the input gradients flow, each GEMM layer stashes its input and output gradient), then
  W = `stash.compute()` (one weight-gradient GEMM per layer use);
- re-walk: B = `autograd.grad(loss, non-GEMM parameters, retain_graph=True)`, then
  W = `autograd.grad(loss, GEMM weights)`: the second walk recomputes the input gradients too.
Printed: median seconds of the backward part of each (forward excluded), and the ratios
(B + W) / full. The weight gradients of the three are checked to agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megads.model.fp8 import Fp8Factory
from megads.model.linear import WeightGradStash, deferrable_layers, deferring
from megads.model.transformer import DeepseekV3
from tools.count_params import load_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp8"])
    args = ap.parse_args()
    cfg = load_preset(args.preset)
    torch.manual_seed(0)
    model = DeepseekV3(cfg, factory=Fp8Factory() if args.precision == "fp8" else None)
    layers = deferrable_layers(model)
    gemm = [m.weight for m in layers]
    gemm_ids = {id(w) for w in gemm}
    others = [p for p in model.parameters() if id(p) not in gemm_ids]
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)

    def loss() -> torch.Tensor:
        return model.compute_loss(ids, labels, mtp_weight=0.3).total

    def full() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = loss()
        t0 = time.perf_counter()
        out.backward()
        return time.perf_counter() - t0, [w.grad for w in gemm]

    def deferred() -> tuple[float, list[torch.Tensor]]:
        out = loss()
        stash = WeightGradStash()
        t0 = time.perf_counter()
        with deferring(layers, stash):
            torch.autograd.grad(out, others, allow_unused=True)
        t_b = time.perf_counter()
        grads = stash.compute()
        w_share.append((time.perf_counter() - t_b) / (time.perf_counter() - t0))
        return time.perf_counter() - t0, [grads[id(w)] for w in gemm]

    def rewalk() -> tuple[float, list[torch.Tensor]]:
        out = loss()
        t0 = time.perf_counter()
        torch.autograd.grad(out, others, allow_unused=True, retain_graph=True)
        grads = torch.autograd.grad(out, gemm)
        return time.perf_counter() - t0, list(grads)

    w_share: list[float] = []  # W's part of the deferred B + W
    times: dict[str, list[float]] = {"full": [], "deferred": [], "rewalk": []}
    ref = None
    for i in range(args.iters + 1):  # alternate to share the machine's noise; the first round warms up
        for name, fn in (("full", full), ("deferred", deferred), ("rewalk", rewalk)):
            t, grads = fn()
            if i:
                times[name].append(t)
            if ref is None:
                ref = [g.clone() for g in grads]
            else:
                worst = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref))
                assert worst < 1e-5, (name, worst)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.preset} {args.precision}, batch {args.batch} x {args.seq}, {len(layers)} GEMM layers: backward "
          f"full {med['full']:.3f} s, B+W deferred {med['deferred']:.3f} s ({med['deferred'] / med['full']:.2f}x, "
          f"W {100 * statistics.median(w_share):.0f}% of it), "
          f"B+W re-walk {med['rewalk']:.3f} s ({med['rewalk'] / med['full']:.2f}x)")


if __name__ == "__main__":
    main()
