"""Printers of schedules: a per-rank text timeline and a PNG (matplotlib).

Both take timed actions, either simulated (`pipeline.validate.simulate` with unit costs) or
measured by the runtime (`StepResult.timeline`: `save_step_png` gathers every rank's and draws
the step, as the trainer does for one step; `from_step_timelines` converts collected lists).
Colours: F blue, B/BW green shades, W grey, F&B purple; the label is the micro-batch, with the
chunk after a dot when a rank holds several chunks.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist
from megads.pipeline.actions import Action, Op, Schedule
from megads.pipeline.runtime import StepResult
from megads.pipeline.validate import Costs, TimedAction, simulate

_COLOURS = {Op.F: "#4c72b0", Op.B: "#55a868", Op.BW: "#2d7a3e", Op.W: "#a0a0a0", Op.FB: "#8172b2"}


def _label(act: Action, multi_chunk: bool) -> str:
    if act.op is Op.FB:
        return f"{act.mb}&{act.mb2}"
    return f"{act.mb}.{act.chunk}" if multi_chunk else f"{act.mb}"


def text_timeline(schedule: Schedule, *, costs: Costs | None = None, cell: int = 5) -> str:
    """One line per rank; each time unit of the simulated timeline is `cell` characters wide."""
    costs = costs or Costs()
    sim = simulate(schedule, costs=costs, strict=False)
    multi = any(len(schedule.layout.chunks_on(r)) > 1 for r in range(schedule.pp))
    unit = min(v for v in (costs.F, costs.B, costs.W) if v > 0)
    width = int(round(sim.makespan / unit)) * cell
    lines = [
        f"{schedule.name}  pp={schedule.pp}  micro-batches={schedule.num_microbatches}  "
        f"makespan={sim.makespan:g}  bubble/rank={max(sim.bubble):g}  (F={costs.F:g} B={costs.B:g} W={costs.W:g})"
    ]
    for r in range(schedule.pp):
        row = [" "] * width
        for ta in (t for t in sim.timeline if t.rank == r):
            a, b = int(round(ta.start / unit)) * cell, int(round(ta.end / unit)) * cell
            text = (ta.action.op.value + _label(ta.action, multi))[: max(b - a - 1, 1)]
            seg = ("[" + text).ljust(b - a, "-")
            row[a:b] = list(seg[: b - a])
        lines.append(f"rank {r:2d} |" + "".join(row).rstrip())
    return "\n".join(lines)


def from_step_timelines(timelines: Sequence[Sequence[tuple[Action, float, float]]]) -> list[TimedAction]:
    """Measured per-rank timelines (`StepResult.timeline` of each rank) as one list."""
    return [TimedAction(r, a, s, e) for r, tl in enumerate(timelines) for a, s, e in tl]


def save_step_png(
    result: StepResult, *, path: str | Path, title: str, group: dist.ProcessGroup | None = None
) -> Path | None:
    """Gather the measured timeline of one step (`record_timeline=True`) from every pipeline rank
    of `group` and draw it on its rank 0 (returns the path there, None elsewhere). Collective.

    Times are aligned with each rank's `time.perf_counter()` at step start, which is one clock for
    all processes of a machine (CLOCK_MONOTONIC); across machines the rows are aligned at 0.
    """
    import socket

    mine = (socket.gethostname(), result.t0, [(a, s, e) for a, s, e in result.timeline])
    gathered: list[tuple[str, float, list[tuple[Action, float, float]]] | None] = [
        None
    ] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    if dist.get_rank(group) != 0:
        return None
    rows = [g for g in gathered if g is not None]
    same_host = len({h for h, _, _ in rows}) == 1
    base = min(t0 for _, t0, _ in rows)
    timeline = [
        TimedAction(r, a, s + (t0 - base if same_host else 0.0), e + (t0 - base if same_host else 0.0))
        for r, (_, t0, tl) in enumerate(rows)
        for a, s, e in tl
    ]
    return save_png(timeline, path=path, title=title, num_ranks=len(rows), unit="s")


def save_png(
    timeline: Sequence[TimedAction],
    *,
    path: str | Path,
    title: str,
    num_ranks: int | None = None,
    unit: str = "",
) -> Path:
    """Draw `timeline` as one horizontal bar row per rank; written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    n = num_ranks if num_ranks is not None else 1 + max(t.rank for t in timeline)
    end = max(t.end for t in timeline)
    multi = len({t.action.chunk for t in timeline if t.rank == 0}) > 1
    fig, ax = plt.subplots(figsize=(min(3 + 0.18 * len(timeline) / max(n, 1), 16), 0.45 * n + 1.0), dpi=80)
    for t in timeline:
        ax.broken_barh(
            [(t.start, t.end - t.start)],
            (n - 1 - t.rank - 0.4, 0.8),
            facecolors=_COLOURS[t.action.op],
            edgecolor="black",
            linewidth=0.4,
        )
        if (t.end - t.start) / end > 0.012:
            ax.text(
                (t.start + t.end) / 2,
                n - 1 - t.rank,
                _label(t.action, multi),
                ha="center",
                va="center",
                fontsize=6,
                color="white",
            )
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"rank {r}" for r in reversed(range(n))], fontsize=7)
    ax.set_xlim(0, end)
    ax.set_xlabel(f"time{(' (' + unit + ')') if unit else ''}", fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(title, fontsize=8, loc="left", pad=14)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLOURS.values()]
    labels = [o.value if o is not Op.FB else "F&B" for o in _COLOURS]
    ax.legend(
        handles, labels, fontsize=6, ncol=5, loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def schedule_png(schedule: Schedule, *, path: str | Path, costs: Costs | None = None) -> Path:
    """PNG of the simulated timeline of `schedule` under `costs` (unit costs by default)."""
    sim = simulate(schedule, costs=costs or Costs(), strict=False)
    title = f"{schedule.name}: pp={schedule.pp}, {schedule.num_microbatches} micro-batches (simulated, unit costs)"
    return save_png(sim.timeline, path=path, title=title, num_ranks=schedule.pp, unit="units")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m pipeline.render NAME --pp 4 --mb 10 [--png PATH]`: print (and draw) a schedule."""
    import argparse

    from megads.pipeline.schedules import build_schedule, schedule_names

    ap = argparse.ArgumentParser(description="Print a pipeline schedule as a per-rank timeline.")
    ap.add_argument("name", choices=schedule_names())
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--mb", type=int, default=8)
    ap.add_argument("--fb", type=float, default=None, help="cost of an F&B pair (default F+B+W = 3 units)")
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    sched = build_schedule(args.name, pp=args.pp, num_microbatches=args.mb)
    costs = Costs(FB=args.fb)
    print(text_timeline(sched, costs=costs))
    if args.png:
        print(f"wrote {schedule_png(sched, path=args.png, costs=costs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
