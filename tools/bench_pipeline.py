"""Benchmark of the pipeline schedules on real gloo ranks with timed (sleeping) stages.

Three measurements, printed as tables (and written to --json):

1. Bubbles. Every chunk's F, B and W is a sleep of one unit (`pipeline.timed.SleepChunk`), so
   the schedule's structure sets the wall time. For pp in --pps and M = --mb-factor * pp
   micro-batches, each schedule runs on pp real ranks through our runtime; per rank,
   bubble = makespan - compute time, compared with the SPEC.md table formula (F=1, B=2 full
   backward, W=1, F&B=3 without overlap; 2 with an overlapping stage). In the same run the same
   chunks are driven by torch.distributed.pipelining's Schedule1F1B and ScheduleDualPipeV; we
   report our DualPipeV makespan / torch's (goal <= 1.0).
2. Memory. Peak number of live micro-batch activations per rank (forward done, weight gradient
   not yet), counted by the runtime and by the stage, against the table (PP; PP+1 for DualPipe).
3. Overlap. One F&B action of a MoE-like chunk pair (attention, dispatch all-to-all, experts,
   combine all-to-all, forward and backward) on 2 ranks: compute is a sleep on the main thread,
   each all-to-all is a latency sleep followed by a real gloo all_to_all_single on a comm thread.
   Sequential (C + A) vs `pipeline.overlap.interleave` (goal: within 15% of max(C, A)).

    .venv/bin/python -m tools.bench_pipeline                 # everything, ~17 minutes (unit 300 ms)
    .venv/bin/python -m tools.bench_pipeline --pps 4 --unit-ms 50 --part bubble   # a quick look

The unit must be large against the fixed cost of a step on the machine (point-to-point hops and
Python on the critical path, 20-90 ms per step on 2 CPU cores): that cost lands in the bubble, so
small units inflate the smallest bubbles (ZB1P, DualPipe, F&B overlap) relative to the formula.
`excess ms` in the table is that absolute cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megads.pipeline.actions import Costs
from megads.pipeline.module_stage import ModuleStage
from megads.pipeline.overlap import CommWorker, interleave
from megads.pipeline.render import from_step_timelines, save_png
from megads.pipeline.runtime import PipelineRuntime
from megads.pipeline.schedules import analytic_bubble, build_schedule, get_schedule, schedule_names
from megads.pipeline.stage import TensorMeta
from megads.pipeline.timed import OverlappingModuleStage, SleepChunk

from megads.testing.launch import free_port

WIDTH = 4
MB_ROWS = 2



def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _loss(out: torch.Tensor, mb: Any) -> torch.Tensor:
    return out.mean()


def _set_unit(chunks: Any, unit: float) -> None:
    for ch in chunks:
        ch.f_s = ch.b_s = ch.w_s = unit


def _input(mb: torch.Tensor) -> torch.Tensor:
    # a leaf that wants a gradient, so the first chunk's B sleeps like every other chunk's
    return mb.clone().requires_grad_(True)


# ----------------------------------------------------------------------------------------------
# 1 + 2: bubbles and memory


def _run_ours(
    name: str, pp: int, m_total: int, unit: float, rank: int, overlap: bool, repeats: int
) -> dict[str, Any]:
    sched = build_schedule(name, pp=pp, num_microbatches=m_total)
    layout = sched.layout
    modules = {
        layout.chunks[c].piece: SleepChunk(f_s=unit, b_s=unit, w_s=unit, width=WIDTH)
        for c in layout.chunks_on(rank)
    }
    cls = OverlappingModuleStage if overlap else ModuleStage
    stage = cls(
        modules,
        layout=layout,
        rank=rank,
        loss_fn=_loss,
        activation_meta=TensorMeta((MB_ROWS, WIDTH)),
        input_fn=_input,
    )
    runtime = PipelineRuntime(sched, stage=stage, rank=rank, record_timeline=True)
    mbs = [torch.zeros(MB_ROWS, WIDTH) for _ in range(m_total)]
    _set_unit(modules.values(), 0.001)  # warm-up step: connections, allocator, autograd
    runtime.step(mbs)
    _set_unit(modules.values(), unit)
    steps = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        res = runtime.step(mbs)
        steps.append((t0, time.perf_counter(), res))
    costs = Costs(FB=2.0 if overlap else 3.0)  # unit F, B, W; an overlapping stage runs F&B in 2
    work_units = sum(costs.of(a.op) for a in sched.actions[rank] if a.op.is_compute)
    return {
        "start": [t0 for t0, _, _ in steps],
        "end": [t1 for _, t1, _ in steps],
        "busy": [res.busy_s for _, _, res in steps],
        "work": work_units * unit,
        "peak_live": max(res.peak_live for _, _, res in steps),
        "stage_peak_live": stage.peak_live,
        "timelines": [
            [(str(a), a.op.value, a.chunk, a.mb, a.chunk2, a.mb2, s, e) for a, s, e in res.timeline]
            for _, _, res in steps
        ],
    }


def _run_torch(name: str, pp: int, m_total: int, unit: float, rank: int, repeats: int) -> dict[str, Any]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleDualPipeV

    device = torch.device("cpu")
    example = torch.zeros(MB_ROWS, WIDTH, requires_grad=True)
    if name == "1f1b":
        indices = [rank]
        num_stages = pp
    else:
        indices = [rank, 2 * pp - 1 - rank]
        num_stages = 2 * pp
    stages = [
        PipelineStage(
            SleepChunk(f_s=unit, b_s=unit, w_s=unit, width=WIDTH),
            i,
            num_stages,
            device,
            input_args=(example,),
            output_args=example,
        )
        for i in indices
    ]
    if name == "1f1b":
        schedule: Any = Schedule1F1B(stages[0], m_total, loss_fn=_loss)
    else:
        schedule = ScheduleDualPipeV(stages, m_total, loss_fn=_loss)
    x = torch.zeros(MB_ROWS * m_total, WIDTH, requires_grad=True)
    target = torch.zeros(MB_ROWS * m_total, WIDTH)
    holds_first = 0 in indices
    holds_last = num_stages - 1 in indices
    chunks = [st.submod for st in stages]
    _set_unit(chunks, 0.001)  # warm-up step
    schedule.step(
        x if holds_first else None, target=target if holds_last else None, losses=[] if holds_last else None
    )
    _set_unit(chunks, unit)
    starts, ends = [], []
    for _ in range(repeats):
        dist.barrier()
        starts.append(time.perf_counter())
        schedule.step(
            x if holds_first else None,
            target=target if holds_last else None,
            losses=[] if holds_last else None,
        )
        ends.append(time.perf_counter())
    work_units = 3 * m_total * len(indices)
    return {"start": starts, "end": ends, "work": work_units * unit}


def _bubble_worker(rank: int, pp: int, port: int, cfg: dict[str, Any], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=pp)
    torch.set_num_threads(1)
    unit = cfg["unit_ms"] / 1000.0
    m_total = cfg["mb_factor"] * pp
    runs: list[tuple[str, str, bool]] = [("ours", s, False) for s in schedule_names()]
    runs += [("ours", s, True) for s in schedule_names() if get_schedule(s).has_fb_pairs]
    # torch.distributed.pipelining's implementations of two of ours, to compare against
    runs += [("torch", "1f1b", False), ("torch", "dualpipev", False)]
    rows: dict[str, Any] = {}
    for impl, name, overlap in runs:
        key = f"{impl}:{name}{':overlap' if overlap else ''}"
        if cfg.get("runs") and key not in cfg["runs"]:
            continue
        try:
            if impl == "ours":
                row = _run_ours(name, pp, m_total, unit, rank, overlap, cfg["repeats"])
            else:
                row = _run_torch(name, pp, m_total, unit, rank, cfg["repeats"])
        except Exception as exc:  # noqa: BLE001 - report the failure in the table and go on
            row = {"error": f"{type(exc).__name__}: {exc}"}
        gathered: list[Any] = [None] * pp
        dist.all_gather_object(gathered, row)
        rows[key] = gathered
        if rank == 0:
            print(f"  pp={pp} {key} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        _atomic_write(Path(out), json.dumps(rows))


def _summarise(pp: int, rows: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    unit = cfg["unit_ms"] / 1000.0
    table = []
    for key, per_rank in rows.items():
        if any("error" in r for r in per_rank):
            table.append({"pp": pp, "run": key, "error": next(r["error"] for r in per_rank if "error" in r)})
            continue
        impl, name, *rest = key.split(":")
        overlap = bool(rest)
        # best of the repeated steps (least disturbed by other load on the machine)
        spans = [
            max(r["end"][i] for r in per_rank) - min(r["start"][i] for r in per_rank)
            for i in range(len(per_rank[0]["end"]))
        ]
        best = min(range(len(spans)), key=spans.__getitem__)
        makespan = spans[best]
        bubble_work = [makespan - r["work"] for r in per_rank]
        row: dict[str, Any] = {
            "pp": pp,
            "run": key,
            "makespan_s": makespan,
            "bubble_units_work": max(bubble_work) / unit,
        }
        fb = 2.0 if overlap else 3.0
        row["formula_units"] = analytic_bubble(name, pp=pp, F=1, B=2, W=1, FB=fb)
        if impl == "ours":
            bubble_busy = [makespan - r["busy"][best] for r in per_rank]
            row["bubble_units_measured"] = max(bubble_busy) / unit
            row["bubble_units_mean"] = sum(bubble_busy) / len(bubble_busy) / unit
            row["peak_live"] = [r["peak_live"] for r in per_rank]
            row["stage_peak_live"] = [r["stage_peak_live"] for r in per_rank]
        # the absolute excess over the formula: a fixed cost per step (point-to-point hops, Python,
        # sleep overshoot on the critical path), so it shrinks relative to the bubble as the unit grows
        measured = row.get("bubble_units_measured", row["bubble_units_work"])
        row["excess_ms"] = (measured - row["formula_units"]) * unit * 1000.0
        row["best_step"] = best
        row["all_makespans_s"] = spans
        table.append(row)
    return table


def _write_timeline_png(pp: int, rows: dict[str, Any], key: str, img_dir: Path, m_total: int) -> Path | None:
    from megads.pipeline.actions import Action, Op

    per_rank = rows.get(key)
    if not per_rank or any("error" in r for r in per_rank):
        return None
    spans = [
        max(r["end"][i] for r in per_rank) - min(r["start"][i] for r in per_rank)
        for i in range(len(per_rank[0]["end"]))
    ]
    best = min(range(len(spans)), key=spans.__getitem__)
    t0 = min(r["start"][best] for r in per_rank)
    timelines = []
    for r in per_rank:
        offset = r["start"][best] - t0
        tl = []
        for _, op, c, mb, c2, mb2, s, e in r["timelines"][best]:
            tl.append((Action(Op(op), c, mb, chunk2=c2, mb2=mb2), s + offset, e + offset))
        timelines.append(tl)
    name = key.split(":")[1] + ("-overlap" if key.endswith("overlap") else "")
    path = img_dir / f"pipeline_{name}_pp{pp}.png"
    save_png(
        from_step_timelines(timelines),
        path=path,
        title=f"{key} measured on {pp} gloo ranks, {m_total} micro-batches (1 unit = {rows['_unit_ms']} ms)",
        num_ranks=pp,
        unit="s",
    )
    return path


# ----------------------------------------------------------------------------------------------
# 3: overlap


def _overlap_worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ep_group = dist.new_group(list(range(world)))
    c_s = cfg["compute_ms"] / 1000.0 / 4  # four compute pieces: attn, experts (F) and their backward
    a_s = cfg["a2a_ms"] / 1000.0 / 4  # four all-to-alls: dispatch, combine (F) and their backward
    tokens = torch.randn(world * 64, 16)

    def a2a() -> torch.Tensor:
        time.sleep(a_s)
        out_t = torch.empty_like(tokens)
        dist.all_to_all_single(out_t, tokens, group=ep_group)
        return out_t

    def fwd(comm: CommWorker):  # attention -> dispatch -> experts -> combine
        time.sleep(c_s)
        yield comm.submit(a2a)
        time.sleep(c_s)
        yield comm.submit(a2a)
        return "y"

    def bwd(comm: CommWorker):  # combine^T -> experts^T -> dispatch^T -> attention^T
        yield comm.submit(a2a)
        time.sleep(c_s)
        yield comm.submit(a2a)
        time.sleep(c_s)
        return "grad_x"

    def sequential(comm: CommWorker) -> None:
        for gen in (fwd(comm), bwd(comm)):
            for h in gen:
                h.wait()

    results: dict[str, list[float]] = {"sequential": [], "overlapped": []}
    with CommWorker() as comm:
        for _ in range(cfg["repeats"]):
            for mode in ("sequential", "overlapped"):
                dist.barrier()
                t0 = time.perf_counter()
                if mode == "sequential":
                    sequential(comm)
                else:
                    interleave(bwd(comm), fwd(comm))
                results[mode].append(time.perf_counter() - t0)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        _atomic_write(Path(out), json.dumps(results))


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--unit-ms", type=float, default=300.0, help="sleep of one F, B or W of one chunk")
    ap.add_argument("--mb-factor", type=int, default=3, help="micro-batches = factor * pp")
    ap.add_argument("--part", choices=["all", "bubble", "overlap"], default="all")
    ap.add_argument("--compute-ms", type=float, default=240.0, help="overlap part: compute of one F&B pair")
    ap.add_argument(
        "--a2a-ms", type=float, default=240.0, help="overlap part: all-to-all latency of one F&B pair"
    )
    ap.add_argument("--repeats", type=int, default=2, help="measured steps per case (best kept)")
    ap.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help="only these runs of the bubble part, e.g. ours:zb1p ours:dualpipe:overlap torch:dualpipev",
    )
    ap.add_argument("--img-dir", default="docs/img")
    ap.add_argument("--json", default="outputs/bench_pipeline.json")
    args = ap.parse_args(argv)
    cfg = {
        "unit_ms": args.unit_ms,
        "mb_factor": args.mb_factor,
        "compute_ms": args.compute_ms,
        "a2a_ms": args.a2a_ms,
        "repeats": args.repeats,
        "runs": args.runs,
    }
    report: dict[str, Any] = {"config": cfg, "torch": torch.__version__}
    tmpdir = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    if args.part in ("all", "bubble"):
        report["bubble"] = []
        for pp in args.pps:
            t_start = time.perf_counter()
            print(
                f"bubbles: pp={pp}, {args.mb_factor * pp} micro-batches, unit {args.unit_ms} ms", flush=True
            )
            out = tmpdir / f"bubble_pp{pp}.json"
            mp.spawn(_bubble_worker, args=(pp, free_port(), cfg, str(out)), nprocs=pp, join=True)
            rows = json.loads(out.read_text())
            rows["_unit_ms"] = args.unit_ms
            table = _summarise(pp, {k: v for k, v in rows.items() if not k.startswith("_")}, cfg)
            report["bubble"] += table
            for key in (f"ours:{s}" for s in schedule_names()):
                if pp == 4:
                    _write_timeline_png(pp, rows, key, Path(args.img_dir), args.mb_factor * pp)
            print(f"  pp={pp} took {time.perf_counter() - t_start:.1f}s", flush=True)
        _print_bubbles(report["bubble"])
    if args.part in ("all", "overlap"):
        out = tmpdir / "overlap.json"
        mp.spawn(_overlap_worker, args=(2, free_port(), cfg, str(out)), nprocs=2, join=True)
        res = json.loads(out.read_text())
        best_seq, best_ovl = min(res["sequential"]), min(res["overlapped"])
        c_s, a_s = args.compute_ms / 1000, args.a2a_ms / 1000
        report["overlap"] = {
            "compute_s": c_s,
            "a2a_s": a_s,
            "sequential_s": best_seq,
            "overlapped_s": best_ovl,
            "overlapped_over_max": best_ovl / max(c_s, a_s),
            "overlapped_over_sum": best_ovl / (c_s + a_s),
            "all": res,
        }
        print(
            f"overlap: compute C={c_s * 1e3:.0f} ms, all-to-all A={a_s * 1e3:.0f} ms: sequential {best_seq * 1e3:.0f} ms "
            f"(C+A={1e3 * (c_s + a_s):.0f}), F&B interleaved {best_ovl * 1e3:.0f} ms = "
            f"{best_ovl / max(c_s, a_s):.3f} x max(C, A)"
        )
    _atomic_write(Path(args.json), json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


def _print_bubbles(table: list[dict[str, Any]]) -> None:
    print(
        f"{'pp':>3} {'run':28s} {'makespan s':>10} {'bubble(busy)':>12} {'bubble(work)':>12} {'formula':>8} "
        f"{'ratio':>6} {'excess ms':>9}  peak live / rank"
    )
    for row in table:
        if "error" in row:
            print(f"{row['pp']:>3} {row['run']:28s} ERROR {row['error']}")
            continue
        meas = row.get("bubble_units_measured", row["bubble_units_work"])
        ratio = meas / row["formula_units"] if row["formula_units"] else float("nan")
        busy = f"{row['bubble_units_measured']:.2f}" if "bubble_units_measured" in row else "-"
        print(
            f"{row['pp']:>3} {row['run']:28s} {row['makespan_s']:>10.3f} {busy:>12} {row['bubble_units_work']:>12.2f} "
            f"{row['formula_units']:>8.2f} {ratio:>6.3f} {row['excess_ms']:>9.1f}  {row.get('peak_live', '-')}"
        )
    by = {(r["pp"], r["run"]): r for r in table if "error" not in r}
    for pp in sorted({r["pp"] for r in table}):
        ours, theirs = by.get((pp, "ours:dualpipev")), by.get((pp, "torch:dualpipev"))
        if ours and theirs:
            print(
                f"pp={pp}: our DualPipeV / torch ScheduleDualPipeV makespan = {ours['makespan_s'] / theirs['makespan_s']:.3f}"
            )
        ours, theirs = by.get((pp, "ours:1f1b")), by.get((pp, "torch:1f1b"))
        if ours and theirs:
            print(
                f"pp={pp}: our 1F1B / torch Schedule1F1B makespan = {ours['makespan_s'] / theirs['makespan_s']:.3f}"
            )


if __name__ == "__main__":
    sys.exit(main())
