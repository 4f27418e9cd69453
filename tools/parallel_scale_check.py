"""Scale check: expert parallelism over many CPU ranks, exact against one process.

    .venv/bin/python -m tools.parallel_scale_check --ep 64      (the issue's target)
    .venv/bin/python -m tools.parallel_scale_check --ep 32      (what fits beside other work)

Runs pp=1, dp=ep (edp=1) on `--ep` gloo ranks with a tiny model of `--experts` routed experts
(default 64, one per rank at ep=64), node-limited routing as in DeepSeek-V3 (8 expert groups on
8 simulated nodes, topk_group = M = 4), two optimizer steps with 2 micro-batches per rank, and
compares losses, parameters and balancing biases with a single-process run (1e-5 relative).
Prints the peak resident memory of every rank (from getrusage) and of the whole job.
Refuses to start when the estimated memory (ranks x --mib-per-rank) exceeds what is available.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from megads.parallel.executor import OptimSettings
from megads.testing.parallel import (
    LayoutSpec,
    compare_with_reference,
    equivalence_worker,
    make_batches,
    reference_run,
    spawn,
    tiny_config,
)


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ep", type=int, default=64)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--mib-per-rank", type=float, default=200.0, help="memory estimate per rank for the refusal")
    args = ap.parse_args()
    need = args.ep * args.mib_per_rank
    have = available_mib()
    if need > 0.9 * have:
        raise SystemExit(
            f"ep={args.ep} needs about {need:.0f} MiB ({args.mib_per_rank:.0f} MiB per rank) but only "
            f"{have:.0f} MiB are available; use --ep {int(0.9 * have // args.mib_per_rank)} or free memory"
        )
    cfg = tiny_config(n_routed_experts=args.experts, n_group=8, topk_group=4, num_experts_per_tok=4,
                      num_hidden_layers=2)
    mbs, per_rank_mb = 1, 2
    batches = make_batches(cfg, steps=args.steps, global_batch=args.ep * mbs * per_rank_mb, seq_len=16)
    optim = OptimSettings(lr=1e-3, weight_decay=0.1, max_grad_norm=1.0, bias_update_speed=1e-3)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    ref = reference_run(cfg, batches=batches, micro_batch_size=mbs, mtp_weight=0.3, optim=optim, seed=3)
    print(f"reference: {time.perf_counter() - t0:.1f}s, losses {[round(x, 6) for x, _ in ref['losses']]}", flush=True)
    spec = LayoutSpec(1, args.ep, ranks_per_node=max(1, args.ep // 8))
    with tempfile.TemporaryDirectory() as out:
        t1 = time.perf_counter()
        spawn(args.ep, equivalence_worker, cfg, [spec], batches, mbs, 0.3, optim, 3, out)
        wall = time.perf_counter() - t1
        problems = compare_with_reference(ref, outdir=out, tag=spec.tag, world=args.ep, rtol=1e-5)
        loaded = [torch.load(os.path.join(out, f"{spec.tag}.rank{r}.pt"), weights_only=False) for r in range(args.ep)]
        rss = [x["peak_rss_mib"] for x in loaded]
        priv = [x["private_mib"] for x in loaded]
        res0 = torch.load(os.path.join(out, f"{spec.tag}.rank0.pt"), weights_only=False)
        step_wall = res0["wall_s"]
        nodes = max(m[5]["max_nodes_per_token"] for m in res0["metrics"])
    print(f"ep={args.ep} ranks, {args.experts} experts ({args.experts // args.ep} per rank), "
          f"spawn+run {wall:.1f}s, {args.steps} steps {step_wall:.2f}s")
    print(f"node-limited routing: 8 simulated nodes of {max(1, args.ep // 8)} ranks, topk_group=4 -> "
          f"at most {nodes} nodes per token seen on rank 0 (limit M = 4)")
    print(f"peak RSS per rank (shared pages included): min {min(rss):.0f} MiB, max {max(rss):.0f} MiB")
    print(f"private memory per rank at the end: min {min(priv):.0f} MiB, max {max(priv):.0f} MiB, "
          f"sum {sum(priv):.0f} MiB")
    if problems:
        print("MISMATCH:\n" + "\n".join(problems[:20]))
        raise SystemExit(1)
    print(f"exact against one process (1e-5 relative): losses, parameters, biases on all {args.ep} ranks")


if __name__ == "__main__":
    main()
