"""The capacity planner against measurements on this machine and against two published points.

    .venv/bin/python -m tools.plan_validate --part activations --model tiny --seq-len 64
    .venv/bin/python -m tools.plan_validate --part activations --model small --seq-len 64
    .venv/bin/python -m tools.plan_validate --part published

`activations`: pp = 2 real gloo ranks (ep 1), one optimizer step per schedule (1f1b, dualpipe,
dualpipev) with 4 micro-batches of 2 sequences; each rank's peak of live saved-for-backward bytes
(`megads.testing.activations.SavedTensorTracker`) against the planner's prediction for that rank
(`megads.plan.estimate.rank_activation_peak` over the per-piece bytes of `megads.plan.activations`),
float32. `published`: the planner's GPU-hours per trillion tokens for DeepSeek-V3's layout
(reported 180K H800 GPU-hours) and its TFLOP/s per GPU for Megatron-Core's DeepSeek-V3 on 1,024
H100 (reported 368 with FP8 blockwise), with the default efficiency assumptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from typing import Any

import torch

from megads.parallel.stages import piece_specs
from megads.plan.cli import compose_plan, given_candidate
from megads.plan.estimate import (
    Candidate,
    _schedule,
    estimate,
    layout_plan,
    piece_work,
    rank_activation_peak,
)
from megads.testing.activations import pipeline_peak_worker
from megads.testing.parallel import spawn

SCHEDULES = ("1f1b", "dualpipe", "dualpipev")

# The two published points and the planner overrides that describe them.
DEEPSEEK_V3 = ["model=deepseek_v3_671b", "cluster=h800_2048", "parallel=deepseek_v3_2048", "seq_len=4096",
               "precision=fp8", "global_batch=15360", "recompute=selective"]
MEGATRON_H100 = ["model=deepseek_v3_671b", "cluster=h100_1024", "parallel=deepseek_v3_2048", "parallel.pp=8",
                 "parallel.ep=64", "parallel.schedule=dualpipev", "seq_len=4096", "precision=fp8",
                 "global_batch=8192", "recompute=selective"]


def activation_rows(model: str, *, seq_len: int, microbatches: int = 4, mbs: int = 2,
                    schedules: tuple[str, ...] = SCHEDULES) -> list[dict[str, Any]]:
    """Measured and predicted peak saved bytes per pipeline rank, one row per (schedule, rank)."""
    pc = compose_plan([f"model={model}", "precision=fp32", f"seq_len={seq_len}",
                       f"global_batch={microbatches * mbs}", "plots=false", "balance_stages=false"])
    pc = dataclasses.replace(pc, cluster=dataclasses.replace(pc.cluster, nodes=1, gpus_per_node=2))
    cfg_kwargs = {f.name: getattr(pc.model, f.name) for f in dataclasses.fields(pc.model)}
    cfg_kwargs["rope_scaling"] = None if pc.model.rope_scaling is None else dataclasses.asdict(pc.model.rope_scaling)
    cases = [(s, microbatches, mbs) for s in schedules]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        spawn(2, pipeline_peak_worker, cfg_kwargs, cases, seq_len, d)
        wall = time.perf_counter() - t0
        for s, m, b in cases:
            meas = [torch.load(os.path.join(d, f"peak_{s}_{r}.pt")) for r in range(2)]
            cand = Candidate(pp=2, ep=1, schedule=s, micro_batch_size=b, recompute="none",
                             stage_layers=tuple(meas[0]["stage_layers"]))
            plan = layout_plan(pc, cand)
            works = [piece_work(pc.model, sp, plan, pc, cand) for sp in piece_specs(plan.stage_layers)]
            sched = _schedule(cand, m)
            for r in range(2):
                pred = rank_activation_peak(sched, rank=r, piece_bytes=[w.act_bytes for w in works])
                rows.append({"model": model, "schedule": s, "rank": r, "measured": meas[r]["peak"],
                             "predicted": pred, "ratio": pred / meas[r]["peak"],
                             "wall_s": wall})
    return rows


def published_rows() -> list[dict[str, Any]]:
    """The planner against DeepSeek-V3's 180K GPU-hours and Megatron-Core's 368 TFLOP/s/GPU."""
    out = []
    for name, overrides, reported, key in (
        ("DeepSeek-V3, 2,048 H800, PP16 / EP64 / ZeRO-1 / DualPipe / FP8", DEEPSEEK_V3, 180e3, "gpu_hours"),
        ("Megatron-Core DeepSeek-V3, 1,024 H100, FP8 blockwise (TP2 / PP8 / EP64 there; no TP here)",
         MEGATRON_H100, 368.0, "model_tflops_per_gpu"),
    ):
        pc = compose_plan([*overrides, "plots=false"])
        est = estimate(pc, given_candidate(pc, balance=pc.balance_stages))
        value = getattr(est, key)
        out.append({"point": name, "overrides": overrides, "quantity": key, "predicted": value,
                    "reported": reported, "ratio": value / reported, "estimate": est})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["activations", "published"], default="published")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--seq-len", type=int, default=64)
    args = ap.parse_args()
    if args.part == "activations":
        rows = activation_rows(args.model, seq_len=args.seq_len)
        print(f"{'model':6s} {'schedule':10s} {'rank':>4s} {'measured B':>14s} {'predicted B':>14s} {'ratio':>7s}")
        for r in rows:
            print(f"{r['model']:6s} {r['schedule']:10s} {r['rank']:>4d} {r['measured']:>14,d} "
                  f"{r['predicted']:>14,.0f} {r['ratio']:>7.4f}")
        print(f"spawn + 3 steps: {rows[0]['wall_s']:.1f} s")
    else:
        for r in published_rows():
            print(f"{r['point']}: predicted {r['predicted']:,.0f} {r['quantity']}, reported {r['reported']:,.0f}, "
                  f"ratio {r['ratio']:.3f}")


if __name__ == "__main__":
    main()
