"""Routed-expert grouped GEMM: `torch._grouped_mm` against the per-expert loop, same run.

    python -m tools.bench_grouped [--experts 32] [--rows 2048] [--hidden 512] [--inter 512]
                                  [--iters 20] [--device cpu|cuda] [--dtype float32|bfloat16]

Rows are spread over the experts by a seeded multinomial draw (some experts get more than
others, as routing does). Each variant runs forward + backward of one `grouped_mm` (the loop:
one `torch.mm` per expert and GEMM; the kernel: three `_grouped_mm` calls); printed are the
median milliseconds of each and the ratio kernel / loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megads.model.linear import grouped_kernel_usable, grouped_mm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(args.experts), args.rows, replacement=True, generator=gen)
    counts = counts.bincount(minlength=args.experts).tolist()
    x = torch.randn(args.rows, args.hidden, generator=gen).to(args.device, dtype)
    w = torch.randn(args.experts, args.inter, args.hidden, generator=gen).to(args.device, dtype)
    g = torch.randn(args.rows, args.inter, generator=gen).to(args.device, dtype)
    if not grouped_kernel_usable(x, w):
        raise SystemExit(f"torch._grouped_mm cannot run {args.dtype} on {args.device} here (see grouped_kernel_usable)")

    def run(kernel: bool) -> float:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        grouped_mm(xr, wr, counts, kernel=kernel).backward(g)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(args.iters + 2):  # alternate to share the machine's noise; the first two warm up
        for kernel in (False, True):
            t = run(kernel)
            if i >= 2:
                times[kernel].append(t)
    loop, kern = (statistics.median(times[k]) * 1e3 for k in (False, True))
    print(f"grouped GEMM fwd+bwd, {args.experts} experts, {args.rows} rows, {args.hidden} -> {args.inter}, "
          f"{args.dtype} on {args.device}: loop {loop:.2f} ms, _grouped_mm {kern:.2f} ms, ratio {kern / loop:.2f}")


if __name__ == "__main__":
    main()
