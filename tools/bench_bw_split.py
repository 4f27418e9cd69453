"""Cost of the B/W split: B + W against one full backward, with deferred weight gradients and
with the graph walked twice (what megads did before), same run.

    python -m tools.bench_bw_split [--preset small] [--batch 2] [--seq 128] [--iters 5] [--precision fp32|fp8]
                                   [--threads N] [--no-rewalk]

One forward of the whole model (no MTP weight: its loss is included) per measurement, then:
- full: `loss.backward()` (input and weight gradients in one walk);
- deferred: B = `autograd.grad(loss, non-GEMM parameters)` inside `deferring(all GEMM layers)`
  (the input gradients flow, each GEMM layer stashes its input and output gradient), then
  W = `stash.compute()` (one weight-gradient GEMM per layer use);
- re-walk: B = `autograd.grad(loss, non-GEMM parameters, retain_graph=True)`, then
  W = `autograd.grad(loss, GEMM weights)`: the second walk recomputes the input gradients too.
Printed: median seconds of the backward part of each (forward excluded), and the ratios
(B + W) / full, in wall time and in the process's CPU time (user + system of all its threads:
on a machine shared with other jobs the CPU time is the steadier of the two, `--threads 1`
steadier still). Every variant starts from the same state (gradients freed, the previous
variant's results dropped), so none runs with more memory held than another. The weight
gradients of the three are checked to agree.
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
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-rewalk", action="store_true", help="skip the (slow) re-walk variant")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
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
        model.zero_grad(set_to_none=True)
        return model.compute_loss(ids, labels, mtp_weight=0.3).total

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def full() -> tuple[tuple[float, float], list[torch.Tensor]]:
        out = loss()
        t0 = clocks()
        out.backward()
        t1 = clocks()
        return (t1[0] - t0[0], t1[1] - t0[1]), [w.grad for w in gemm]

    def deferred() -> tuple[tuple[float, float], list[torch.Tensor]]:
        out = loss()
        stash = WeightGradStash()
        t0 = clocks()
        with deferring(layers, stash):
            torch.autograd.grad(out, others, allow_unused=True)
        t_b = clocks()
        grads = stash.compute()
        t1 = clocks()
        w_share.append((t1[1] - t_b[1]) / max(t1[1] - t0[1], 1e-9))
        return (t1[0] - t0[0], t1[1] - t0[1]), [grads[id(w)] for w in gemm]

    def rewalk() -> tuple[tuple[float, float], list[torch.Tensor]]:
        out = loss()
        t0 = clocks()
        torch.autograd.grad(out, others, allow_unused=True, retain_graph=True)
        grads = torch.autograd.grad(out, gemm)
        t1 = clocks()
        return (t1[0] - t0[0], t1[1] - t0[1]), list(grads)

    variants = [("full", full), ("deferred", deferred)] + ([] if args.no_rewalk else [("rewalk", rewalk)])
    w_share: list[float] = []  # W's part of the deferred B + W (CPU time)
    wall: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    ref: list[torch.Tensor] | None = None
    for i in range(args.iters + 1):  # alternate to share the machine's noise; the first round warms up
        for name, fn in variants:
            (t_wall, t_cpu), grads = fn()
            if i:
                wall[name].append(t_wall)
                cpu[name].append(t_cpu)
            if ref is None:
                ref = [g.clone() for g in grads]
            else:
                worst = max(float((g - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(grads, ref))
                assert worst < 1e-5, (name, worst)
            del grads  # the next variant starts with no other variant's results alive
    model.zero_grad(set_to_none=True)
    threads = torch.get_num_threads()
    print(f"{args.preset} {args.precision}, batch {args.batch} x {args.seq}, {len(layers)} GEMM layers, "
          f"{threads} thread(s), median of {args.iters}:")
    for what, times in (("wall", wall), ("cpu", cpu)):
        med = {k: statistics.median(v) for k, v in times.items()}
        line = (f"  {what:4s}: backward full {med['full']:.3f} s, B+W deferred {med['deferred']:.3f} s "
                f"({med['deferred'] / med['full']:.3f}x)")
        if "rewalk" in med:
            line += f", B+W re-walk {med['rewalk']:.3f} s ({med['rewalk'] / med['full']:.2f}x)"
        print(line)
    best = {k: min(v) for k, v in cpu.items()}  # the least disturbed round of each
    print(f"  cpu best of {args.iters}: backward full {best['full']:.3f} s, B+W deferred {best['deferred']:.3f} s "
          f"({best['deferred'] / best['full']:.3f}x)")
    ratios = sorted(c / f for c, f in zip(cpu["deferred"], cpu["full"]))
    print(f"  per-round CPU ratios deferred / full: {', '.join(f'{r:.3f}' for r in ratios)}; "
          f"W {100 * statistics.median(w_share):.0f}% of B+W")


if __name__ == "__main__":
    main()
