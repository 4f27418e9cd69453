"""Context parallel at one long length: step time, activation peak and exchange bytes per cp.

    .venv/bin/python -m tools.bench_context_parallel [--preset tiny] [--seq 4096] [--cps 1 2 4]
        [--steps 3] [--batch 1] [--out docs/img/context_parallel_tiny.png]

For each cp it spawns cp gloo ranks of pp 1 x ep 1 x cp, each with cores / cp threads (at least
one: every cp uses the whole machine; the cp = 1 peer is the same model on one rank, in the same
run), trains `--steps` steps of a global batch of
`--batch` sequences (the first is a warm-up) and reports per rank:
- the median step time of the timed steps;
- the peak of the bytes autograd saves for backward during one step
  (`megads.testing.activations.SavedTensorTracker`, the activations), and its ratio to cp = 1;
- the latent bytes this rank sent in the step's cp exchanges (forward all-gathers and backward
  latent-gradient all-to-alls), checked against the analytic count, and the bytes a per-head
  key/value exchange of the same rows would need (the ratio printed).

On a 2-core machine cp = 4 oversubscribes the cores (4 ranks of one thread), so its step time is
not a speed-up figure; memory and bytes do not depend on that. Figures: docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def analytic_bytes(cfg: Any, *, cp: int, seq: int, batch: int, elt: int = 4) -> tuple[int, int]:
    """(latent bytes, per-head K/V bytes) one rank sends in one step of `batch` sequences at pp1:
    every attention layer (main and MTP) all-gathers its rows forward and returns their gradient
    backward, to cp-1 peers each way."""
    from megads.parallel.context_parallel import kv_values_per_token, latent_values_per_token

    if cp == 1:
        return 0, 0
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    rows = batch * seq // cp
    per_value = 2 * (cp - 1) * rows * layers * elt
    return per_value * latent_values_per_token(cfg), per_value * kv_values_per_token(cfg)


def worker(rank: int, world: int, preset: str, seq: int, batch: int, steps: int, outdir: str) -> None:
    import torch

    from megads.parallel.executor import OptimSettings, ParallelExecutor
    from megads.parallel.mesh import ParallelMesh, plan_layout
    from megads.testing.activations import SavedTensorTracker
    from tools.count_params import load_preset

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cfg = load_preset(preset).replace(max_position_embeddings=max(seq, 4096))
    plan = plan_layout(world_size=world, pp=1, ep=1, cp=world, num_layers=cfg.num_hidden_layers,
                       n_routed_experts=cfg.n_routed_experts)
    ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, micro_batch_size=batch, seed=0,
                          optim=OptimSettings(lr=1e-4))
    g = torch.Generator().manual_seed(1)
    times, peak, sent = [], 0, 0
    for i in range(steps):
        tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g)
        tracker = SavedTensorTracker(exclude=list(ex.model.parameters())) if i == 1 or steps == 1 else None
        t0 = time.perf_counter()
        if tracker is not None:
            with tracker:
                m = ex.step(tok[:, :-1], tok[:, 1:], mtp_weight=0.3)
            peak = tracker.peak
        else:
            m = ex.step(tok[:, :-1], tok[:, 1:], mtp_weight=0.3)
        if i > 0 or steps == 1:
            times.append(time.perf_counter() - t0)
        sent = int(m.extras["cp_bytes"])
    torch.save({"rank": rank, "times": times, "peak": peak, "sent": sent, "loss": m.loss},
               Path(outdir) / f"cp{world}.rank{rank}.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None, help="PNG of peak memory and step time per cp")
    args = ap.parse_args()
    import torch

    from megads.testing.parallel import spawn
    from tools.count_params import load_preset

    cfg = load_preset(args.preset)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cp in args.cps:
            spawn(cp, worker, args.preset, args.seq, args.batch, args.steps, d)
            res = [torch.load(Path(d) / f"cp{cp}.rank{r}.pt", weights_only=False) for r in range(cp)]
            latent, kv = analytic_bytes(cfg, cp=cp, seq=args.seq, batch=args.batch)
            rows.append({
                "cp": cp, "step_s": statistics.median(max(r["times"][i] for r in res) for i in range(len(res[0]["times"]))),
                "peak_mib": max(r["peak"] for r in res) / 2**20, "sent_bytes": res[0]["sent"],
                "analytic_latent_bytes": latent, "kv_bytes": kv, "loss": res[0]["loss"],
            })
    base = rows[0]
    print(f"context parallel, {args.preset}, {args.batch} x {args.seq} tokens, pp1 x ep1, fp32, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print("| cp | step s | vs cp=1 | activation peak MiB/rank | vs cp=1 | latent bytes sent/rank | = analytic | "
          "K/V exchange bytes | K/V / latent | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['kv_bytes'] / r['sent_bytes']:.1f}x" if r["sent_bytes"] else "-"
        print(f"| {r['cp']} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} | {r['peak_mib']:.1f} | "
              f"{r['peak_mib'] / base['peak_mib']:.2f} | {r['sent_bytes']:,} | "
              f"{'yes' if r['sent_bytes'] == r['analytic_latent_bytes'] else 'NO'} | {r['kv_bytes']:,} | {ratio} | "
              f"{r['loss']:.6f} |")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        cps = [r["cp"] for r in rows]
        ax[0].plot(cps, [r["peak_mib"] for r in rows], "o-", label="measured")
        ax[0].plot(cps, [base["peak_mib"] / c for c in cps], "--", label="cp=1 / cp")
        ax[0].set(xlabel="cp", ylabel="activation peak per rank (MiB)", xticks=cps, title="memory")
        ax[0].legend()
        ax[1].bar([str(c) for c in cps], [r["step_s"] for r in rows])
        ax[1].set(xlabel="cp", ylabel="step (s)", title=f"step time ({os.cpu_count()} cores)")
        fig.suptitle(f"context parallel: {args.preset}, {args.batch} x {args.seq} tokens")
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"wrote {args.out}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
