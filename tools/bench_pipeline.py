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
4. Real stages (`--part real`, not in `all`). The DeepSeek stage itself (`DeepseekStage`, built by
   `ParallelExecutor`: tiny / small, MTP on, EP = 2 all-to-alls over gloo) on 4 CPU ranks,
   pp 2 x ep 2 (dp 2), driven in the same run, step after step alternately, by megads' DualPipeV
   with the overlapped F&B and by torch.distributed.pipelining's `ScheduleDualPipeV` over the
   same modules (one `PipelineStage` per model piece, the piece's forward being the stage's
   un-cut forward; no overlap there). Forward + backward of one batch, no optimizer step. Prints
   the median step times, their ratio megads / torch (goal <= 0.85) and both losses of the
   batch (the same model on the same micro-batches: equal within float32 rounding).

    .venv/bin/python -m tools.bench_pipeline                 # parts 1-3, ~17 minutes (unit 300 ms)
    .venv/bin/python -m tools.bench_pipeline --pps 4 --unit-ms 50 --part bubble   # a quick look
    .venv/bin/python -m tools.bench_pipeline --part real --models tiny small      # part 4

The unit must be large against the fixed cost of a step on the machine (point-to-point hops and
Python on the critical path, 20-90 ms per step on 2 CPU cores): that cost lands in the bubble, so
small units inflate the smallest bubbles (ZB1P, DualPipe, F&B overlap) relative to the formula.
`excess ms` in the table is that absolute cost.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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
# 4: real DeepSeek stages, megads DualPipeV (overlapped F&B) vs torch ScheduleDualPipeV


class _TorchPiece(torch.nn.Module):
    """One model piece of a `DeepseekStage` as the module of a torch `PipelineStage`.

    Its forward is the stage's forward of that chunk without cuts (`overlap=False`: the expert
    all-to-alls are autograd functions inside the graph). Between pieces it passes the hidden
    state and the running sum of the balance losses ([1]: what megads' stage keeps as a second
    output), so the last piece returns the micro-batch's whole loss. `ids` / `labels` arrive as
    keyword arguments (torch's schedules hand the micro-batch's kwargs to every stage).
    Registered submodules: only the piece's own (torch's weight backward walks `parameters()`).
    """

    def __init__(self, stage: Any, chunk: int) -> None:
        super().__init__()
        self.stage, self.chunk = stage, chunk
        spec = stage.specs[stage.layout.chunks[chunk].piece]
        self.first, self.last = spec.first, spec.last
        m = stage.model
        self.held = torch.nn.ModuleList([m.layers[str(i)] for i in spec.layers])
        if spec.first or (spec.last and m.mtp):
            self.held.append(m.embed_tokens)
        if spec.last:
            self.held.extend([m.norm, m.lm_head, m.mtp])

    def forward(self, *args: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> Any:
        st = self.stage
        x, bal_in = (None, None) if self.first else args
        st._microbatches = [(ids, labels)]
        y = st.forward(self.chunk, 0, x)
        tape = st._tapes.pop((self.chunk, 0))
        outs = tape.segments[-1].outs
        bal = bal_in if bal_in is not None else y.new_zeros(1)  # [1]
        if self.last:
            # [1] (torch concatenates the last stage's outputs): the micro-batch's total loss, with the
            # earlier pieces' balance losses added
            return y.reshape(1) + bal
        own = outs[1] if len(outs) > 1 else y.new_zeros(())
        return y, bal + own  # a fresh [1] tensor, not a view: torch detaches stage outputs in place


def _real_preset(preset: str, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """Both schedules on one model preset, alternately, step after step (see part 4)."""
    from torch.distributed.pipelining import PipelineStage, ScheduleDualPipeV

    from megads.parallel.executor import ParallelExecutor
    from megads.parallel.mesh import ParallelMesh, plan_layout
    from megads.parallel.stages import DeepseekStage, rank_pieces
    from tools.count_params import load_preset

    pp, ep = 2, 2
    m_total, T, mtp_weight = cfg["microbatches"], cfg["seq_len"], 0.3
    mcfg = load_preset(preset)
    plan = plan_layout(world_size=world, pp=pp, ep=ep, num_layers=mcfg.num_hidden_layers,
                       n_routed_experts=mcfg.n_routed_experts, n_group=mcfg.n_group,
                       topk_group=mcfg.topk_group, pieces_per_rank=2)
    mesh = ParallelMesh.build(plan)
    ex = ParallelExecutor(mcfg, mesh=mesh, plan=plan, schedule="dualpipev", seed=0, overlap_fb=True)
    rt, ours = ex._runtime(m_total, mtp_weight=mtp_weight)
    ours.on_chunk_grads_final = None  # no ZeRO-1 reduction inside the timed step: torch has none
    # the same modules, torch's schedule: one PipelineStage per piece (V: pieces r and 2pp-1-r)
    plain = DeepseekStage(ex.model, layout=ours.layout, rank=mesh.pp_rank, specs=ex.specs,
                          pp_group=mesh.pp_group, mtp_weight=mtp_weight, grad_scale=1.0, overlap=False)
    g = torch.Generator().manual_seed(100 + mesh.dp_rank)  # each data-parallel replica its own batch
    tok = torch.randint(0, mcfg.vocab_size, (m_total, T + 1), generator=g)
    ids_MT, labels_MT = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    mbs = [(ids_MT[i : i + 1], labels_MT[i : i + 1]) for i in range(m_total)]
    # examples of what crosses between pieces (torch makes a received tensor require a gradient
    # when its example does)
    h = torch.zeros(1, T, mcfg.hidden_size, requires_grad=True)
    bal = torch.zeros(1, requires_grad=True)
    stages = []
    for piece in rank_pieces(ours.layout, rank=mesh.pp_rank):
        chunk = next(c for c in ours.layout.chunks_on(mesh.pp_rank) if ours.layout.chunks[c].piece == piece)
        first, last = piece == 0, piece == 2 * pp - 1
        stages.append(PipelineStage(
            _TorchPiece(plain, chunk), piece, 2 * pp, torch.device("cpu"),
            input_args=(ids_MT[:1],) if first else (h, bal),
            output_args=torch.zeros(1) if last else (h, bal), group=mesh.pp_group,
        ))
    stages.sort(key=lambda st: st.stage_index)
    torch_sched = ScheduleDualPipeV(stages, m_total, loss_fn=lambda out, target: out.sum())
    holds_first = any(st.stage_index == 0 for st in stages)
    holds_last = any(st.stage_index == 2 * pp - 1 for st in stages)

    def run_ours() -> float:
        rt.step(mbs)
        s = ours.stats.clone()
        dist.all_reduce(s, group=mesh.pp_group)
        return float(s[0] + mtp_weight * s[1] + s[2]) / m_total

    def run_torch() -> float:
        plain.begin_step(microbatches=mbs, num_microbatches=m_total)
        losses: list[torch.Tensor] = []
        torch_sched.step(ids_MT if holds_first else None, ids=ids_MT, labels=labels_MT,
                         target=labels_MT if holds_last else None, losses=losses if holds_last else None)
        plain._microbatches = None
        val = torch.tensor([float(torch.stack(losses).mean().detach()) if losses else 0.0], dtype=torch.float64)
        dist.all_reduce(val, group=mesh.pp_group)
        return float(val)

    times: dict[str, list[float]] = {"megads": [], "torch": []}
    cpu: dict[str, list[float]] = {"megads": [], "torch": []}
    loss: dict[str, float] = {}
    for i in range(cfg["warmup"] + cfg["repeats"]):
        for name, fn in (("megads", run_ours), ("torch", run_torch)):
            ex.model.zero_grad(set_to_none=True)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            loss[name] = fn()
            dt = torch.tensor([time.perf_counter() - t0])
            dc = torch.tensor([time.process_time() - c0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)  # the step ends when its last rank does
            dist.all_reduce(dc)  # CPU seconds of all ranks: the work, whatever else loads the machine
            if i >= cfg["warmup"]:
                times[name].append(float(dt))
                cpu[name].append(float(dc))
    return {"times": times, "cpu": cpu, "loss": loss, "dp_rank": mesh.dp_rank, "pp_rank": mesh.pp_rank}


def _real_worker(rank: int, world: int, port: int, cfg: dict[str, Any], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for preset in cfg["models"]:
        results[preset] = _real_preset(preset, world, cfg)
        if rank == 0:
            print(f"  {preset}: done", flush=True)
        dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        _atomic_write(Path(out), json.dumps(gathered))


def _report_real(gathered: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for preset in cfg["models"]:
        per_rank = [g[preset] for g in gathered]
        times = per_rank[0]["times"]  # world maxima: the same on every rank
        med = {k: statistics.median(v) for k, v in times.items()}
        cpu = {k: statistics.median(v) for k, v in per_rank[0]["cpu"].items()}
        # loss of each data-parallel replica's batch, as the pipeline rank holding the head saw it
        losses = {r["dp_rank"]: r["loss"] for r in per_rank if r["pp_rank"] == 0}
        worst = max(abs(v["megads"] - v["torch"]) / abs(v["torch"]) for v in losses.values())
        report[preset] = {"median_s": med, "ratio": med["megads"] / med["torch"], "all_s": times,
                          "median_cpu_s": cpu, "cpu_ratio": cpu["megads"] / cpu["torch"],
                          "losses": losses, "loss_rel_diff": worst}
        print(f"{preset}: pp 2 x ep 2, {cfg['microbatches']} micro-batches of 1 x {cfg['seq_len']} tokens per "
              f"replica: megads DualPipeV (overlapped F&B) {med['megads'] * 1e3:.0f} ms, torch ScheduleDualPipeV "
              f"{med['torch'] * 1e3:.0f} ms per step (median of {len(times['torch'])}); "
              f"megads / torch = {med['megads'] / med['torch']:.3f}; CPU seconds of the 4 ranks per step "
              f"{cpu['megads']:.2f} vs {cpu['torch']:.2f}: {cpu['megads'] / cpu['torch']:.3f}")
        for dp, v in sorted(losses.items()):
            print(f"  replica {dp} loss: megads {v['megads']:.6f}, torch {v['torch']:.6f}")
        print(f"  loss relative difference {worst:.1e}")
    return report


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--unit-ms", type=float, default=300.0, help="sleep of one F, B or W of one chunk")
    ap.add_argument("--mb-factor", type=int, default=3, help="micro-batches = factor * pp")
    ap.add_argument("--part", choices=["all", "bubble", "overlap", "real"], default="all")
    ap.add_argument("--models", nargs="+", default=["tiny", "small"], help="real part: model presets")
    ap.add_argument("--microbatches", type=int, default=8, help="real part: micro-batches per replica and step")
    ap.add_argument("--seq-len", type=int, default=128, help="real part: tokens per sequence")
    ap.add_argument("--warmup", type=int, default=2, help="real part: untimed steps of each schedule")
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
        "models": args.models,
        "microbatches": args.microbatches,
        "seq_len": args.seq_len,
        "warmup": args.warmup,
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
    if args.part == "real":
        out = tmpdir / "real.json"
        print(f"real stages: {', '.join(args.models)} on 4 gloo ranks (pp 2 x ep 2), load {os.getloadavg()[0]:.2f}",
              flush=True)
        mp.spawn(_real_worker, args=(4, free_port(), cfg, str(out)), nprocs=4, join=True)
        report["real"] = _report_real(json.loads(out.read_text()), cfg)
        print(f"load average after: {os.getloadavg()[0]:.2f}")
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
