"""Parallel-core benchmark: tokens/s and all-to-all volume, pp2 x ep2 x dp2 vs pp1 x ep1 x dp8.

    .venv/bin/python -m tools.bench_parallel [--steps 4] [--global-batch 32]

Both layouts run the tiny model (tiny_config: 4 layers, hidden 32, 8 experts, MTP) on the same 8
gloo CPU ranks, one after the other in one spawned group, on the same global batches. Reported
per layout: median step time over the timed steps (the first step is warm-up), tokens/s of the
whole job, and the all-to-all volume of one step summed over ranks: rows each rank sends in the
forward dispatch (measured by the dispatcher), times 4 transfers (dispatch and combine, forward
and backward), times hidden size x 4 bytes; "remote" excludes rows a rank keeps for itself.
The ratio printed is tokens/s(pp2 x ep2 x dp2) / tokens/s(pp1 x ep1 x dp8).

The GPU half of the issue's benchmark (our optimizer path vs torch.optim.AdamW(fused=True)) needs
a GPU and is not part of this script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.testing.parallel import make_batches, spawn, tiny_config

LAYOUTS = [(2, 2), (1, 1)]  # (pp, ep) on 8 ranks: dp = 4 (= ep2 x edp2), dp = 8


def _worker(rank: int, world: int, steps: int, global_batch: int, mbs: int, outdir: str) -> None:
    cfg = tiny_config()
    batches = make_batches(cfg, steps=steps, global_batch=global_batch, seq_len=16)
    for pp, ep in LAYOUTS:
        plan = plan_layout(world_size=world, pp=pp, ep=ep, num_layers=cfg.num_hidden_layers,
                           n_routed_experts=cfg.n_routed_experts)
        mesh = ParallelMesh.build(plan)
        ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, micro_batch_size=mbs, seed=0,
                              optim=OptimSettings(lr=1e-3))
        times, rows, remote = [], [], []
        for ids, labels in batches:
            dist.barrier()
            t0 = time.perf_counter()
            m = ex.step(ids, labels, mtp_weight=0.3)
            t = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            vol = torch.tensor([m.extras["a2a_rows_sent"], m.extras["a2a_remote_rows_sent"]], dtype=torch.float64)
            dist.all_reduce(vol)
            times.append(float(t))
            rows.append(float(vol[0]))
            remote.append(float(vol[1]))
        if rank == 0:
            torch.save({"times": times, "rows": rows, "remote": remote}, os.path.join(outdir, f"pp{pp}_ep{ep}.pt"))
        dist.barrier()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--global-batch", type=int, default=32)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    args = ap.parse_args()
    cfg = tiny_config()
    tokens = args.global_batch * 16
    with tempfile.TemporaryDirectory() as out:
        spawn(8, _worker, args.steps, args.global_batch, args.micro_batch_size, out)
        res = {lay: torch.load(os.path.join(out, f"pp{lay[0]}_ep{lay[1]}.pt")) for lay in LAYOUTS}
    tps = {}
    print(f"tiny model, 8 gloo CPU ranks, global batch {args.global_batch} x 16 tokens, "
          f"micro-batch {args.micro_batch_size}, {args.steps - 1} timed steps")
    for (pp, ep), r in res.items():
        step = statistics.median(r["times"][1:])
        tps[(pp, ep)] = tokens / step
        bytes_per_row = cfg.hidden_size * 4
        vol = statistics.median(r["rows"][1:]) * 4 * bytes_per_row
        rvol = statistics.median(r["remote"][1:]) * 4 * bytes_per_row
        print(f"pp{pp} x ep{ep} x dp{8 // pp // ep}: step {step * 1e3:7.1f} ms, {tps[(pp, ep)]:8.0f} tokens/s, "
              f"all-to-all {vol / 1024:8.1f} KiB/step ({rvol / 1024:.1f} KiB remote)")
    print(f"ratio tokens/s pp2xep2xdp2 / pp1xep1xdp8 = {tps[(2, 2)] / tps[(1, 1)]:.2f}")


if __name__ == "__main__":
    main()
