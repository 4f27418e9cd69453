"""Validator and simulator of schedules: completeness, data dependencies, deadlock freedom, timing.

`simulate` executes every rank's action list symbolically, the way the runtime does: the SEND and
RECV actions queued since the last compute are posted together as one batch when the rank reaches
its next compute action (or the end of its list), and the rank then waits.

Matching model: on every ordered pair of ranks (src, dst) the k-th send posted by src is received
by the k-th receive posted by dst (FIFO, as NCCL and gloo match point-to-point messages without
tags); the two must carry the same label (kind, receiving chunk, micro-batch).

Waiting model for the deadlock proof (`strict=True`): a batch completes only once the counterpart
of every operation in it has been posted. This is what NCCL does (a batched group is one kernel on
a serial stream) and it is stricter than the runtime on gloo (which waits only for the receives a
compute needs), so a schedule accepted here cannot deadlock there either: waiting less only posts
operations earlier, and FIFO matching does not depend on timing. `strict=False` models the gloo
runtime for timing estimates.

Checks, each raising `ScheduleError` (a ValueError) naming the rank and action:
- every action on a chunk of its own rank, every micro-batch on a path through that chunk;
- F(c, m) exactly once; then either BW(c, m) once or B(c, m) once followed later by W(c, m) once;
- F's input present (micro-batch input, a received activation or a local hand-off from prev(c) on
  the same rank); B's output gradient present (loss, received, or local hand-off from next(c));
- every SEND after the compute that produces its tensor, to the rank of the neighbouring chunk;
- every send matched by a receive with the same label, none left over; no rank blocked forever.

`simulate` also returns a timeline under given action costs (`Costs`, defined in `pipeline.actions`:
the one cost model, also behind the ideal timing that places messages): per-action start/end, per-rank busy
time, bubble (makespan minus busy) and the peak number of live micro-batch activations per rank
(a (chunk, mb) is live from its F until its W or BW).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from megads.pipeline.actions import Action, Costs, Layout, Op, Schedule


class ScheduleError(ValueError):
    """A schedule that is incomplete, inconsistent or deadlocks."""


@dataclass(frozen=True)
class TimedAction:
    rank: int
    action: Action
    start: float
    end: float


@dataclass
class SimResult:
    """Outcome of a simulation."""

    timeline: list[TimedAction]
    makespan: float
    busy: list[float]
    peak_live: list[int]
    num_p2p: int
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def bubble(self) -> list[float]:
        """Per-rank idle time: makespan minus the rank's compute time."""
        return [self.makespan - b for b in self.busy]


def _label(layout: Layout, act: Action) -> tuple[str, int, int]:
    """(kind, receiving chunk, micro-batch) carried by a SEND/RECV."""
    info = layout.chunks[act.chunk]
    if act.op is Op.SEND_F:
        assert info.next is not None
        return ("F", info.next, act.mb)
    if act.op is Op.RECV_F:
        return ("F", act.chunk, act.mb)
    if act.op is Op.SEND_B:
        assert info.prev is not None
        return ("B", info.prev, act.mb)
    return ("B", act.chunk, act.mb)


def _consumes(layout: Layout, act: Action | None, rank: int) -> list[tuple[str, int, int]]:
    """Labels of the received tensors a compute action reads (inputs from other ranks)."""
    if act is None:
        return []
    out = []
    for part in act.parts:
        op, c, m = part.op, part.chunk, part.mb
        if op is Op.W:  # reads nothing from other ranks
            continue
        info = layout.chunks[c]
        nb = info.prev if op is Op.F else info.next
        if nb is not None and layout.chunks[nb].rank != rank:
            out.append(("F" if op is Op.F else "B", c, m))
    return out


def _split_steps(acts: Sequence[Action]) -> list[tuple[list[Action], Action | None]]:
    steps: list[tuple[list[Action], Action | None]] = []
    batch: list[Action] = []
    for a in acts:
        if a.op.is_comm:
            batch.append(a)
        else:
            steps.append((batch, a))
            batch = []
    if batch:
        steps.append((batch, None))
    return steps


def simulate(schedule: Schedule, *, costs: Costs | None = None, strict: bool = True) -> SimResult:
    """Check `schedule` (see the module docstring) and time it; raises ScheduleError when invalid."""
    costs = costs or Costs()
    layout = schedule.layout
    pp = layout.pp
    if len(schedule.actions) != pp:
        raise ScheduleError(f"schedule has {len(schedule.actions)} rank lists, layout has pp={pp}")
    steps = [_split_steps(acts) for acts in schedule.actions]
    pc = [0] * pp
    posted = [False] * pp
    post_time = [0.0] * pp
    clock = [0.0] * pp
    busy = [0.0] * pp
    live = [0] * pp
    peak = [0] * pp
    # channel (src, dst) -> list of (label, post time) for sends and receives, in posting order
    sends: dict[tuple[int, int], list[tuple[tuple[str, int, int], float]]] = defaultdict(list)
    recvs: dict[tuple[int, int], list[tuple[tuple[str, int, int], float]]] = defaultdict(list)
    # index of each posted op of the current batch of each rank in its channel
    posted_idx: list[list[tuple[Action, int]]] = [[] for _ in range(pp)]
    # receives posted and not yet consumed, by label
    outstanding: list[dict[tuple[str, int, int], tuple[Action, int]]] = [{} for _ in range(pp)]
    f_done: set[tuple[int, int]] = set()
    b_done: set[tuple[int, int]] = set()
    w_done: set[tuple[int, int]] = set()
    got_act: set[tuple[int, int]] = set()
    got_grad: set[tuple[int, int]] = set()
    timeline: list[TimedAction] = []

    def err(r: int, a: Action | None, msg: str) -> ScheduleError:
        where = f"rank {r}, step {pc[r]}" + (f", action {a}" if a is not None else "")
        return ScheduleError(
            f"schedule {schedule.name!r} (pp={pp}, mb={schedule.num_microbatches}): {where}: {msg}"
        )

    def check_owner(r: int, a: Action, chunk: int, mb: int) -> None:
        if not 0 <= chunk < len(layout.chunks):
            raise err(r, a, f"chunk {chunk} does not exist")
        info = layout.chunks[chunk]
        if info.rank != r:
            raise err(r, a, f"chunk {chunk} lives on rank {info.rank}")
        if mb not in layout.path_microbatches[info.path]:
            raise err(r, a, f"micro-batch {mb} does not flow through chunk {chunk}")

    def do_f(r: int, a: Action, c: int, m: int) -> None:
        check_owner(r, a, c, m)
        if (c, m) in f_done:
            raise err(r, a, f"F{m}c{c} runs twice")
        info = layout.chunks[c]
        if info.prev is not None:
            prev_local = layout.chunks[info.prev].rank == r
            if prev_local and (info.prev, m) not in f_done:
                raise err(r, a, f"input of F{m}c{c} (local hand-off from chunk {info.prev}) not produced yet")
            if not prev_local and (c, m) not in got_act:
                raise err(r, a, f"input of F{m}c{c} not received (no RECV_F before it)")
        f_done.add((c, m))
        live[r] += 1
        peak[r] = max(peak[r], live[r])

    def do_b(r: int, a: Action, c: int, m: int) -> None:
        check_owner(r, a, c, m)
        if (c, m) not in f_done:
            raise err(r, a, f"backward of micro-batch {m} chunk {c} before its forward")
        if (c, m) in b_done:
            raise err(r, a, f"backward B{m}c{c} runs twice")
        info = layout.chunks[c]
        if info.next is not None:
            next_local = layout.chunks[info.next].rank == r
            if next_local and (info.next, m) not in b_done:
                raise err(
                    r, a, f"output gradient of B{m}c{c} (local hand-off from chunk {info.next}) missing"
                )
            if not next_local and (c, m) not in got_grad:
                raise err(r, a, f"output gradient of B{m}c{c} not received (no RECV_B before it)")
        b_done.add((c, m))

    def do_w(r: int, a: Action, c: int, m: int) -> None:
        check_owner(r, a, c, m)
        if (c, m) not in b_done:
            raise err(r, a, f"W{m}c{c} before B{m}c{c}")
        if (c, m) in w_done:
            raise err(r, a, f"W{m}c{c} runs twice")
        w_done.add((c, m))
        live[r] -= 1

    def counterpart(r: int, a: Action, idx: int) -> tuple[tuple[str, int, int], float] | None:
        if a.op in (Op.SEND_F, Op.SEND_B):
            lst = recvs[(r, a.peer)]
        else:
            lst = sends[(a.peer, r)]
        return lst[idx] if idx < len(lst) else None

    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pc[r] < len(steps[r]):
                batch, comp = steps[r][pc[r]]
                if not posted[r]:
                    posted_idx[r] = []
                    for a in batch:
                        info = layout.chunks[a.chunk] if 0 <= a.chunk < len(layout.chunks) else None
                        if info is None or info.rank != r:
                            raise err(r, a, f"chunk {a.chunk} is not on this rank")
                        if a.op in (Op.SEND_F, Op.RECV_F):
                            nb = info.next if a.op is Op.SEND_F else info.prev
                        else:
                            nb = info.prev if a.op is Op.SEND_B else info.next
                        if nb is None:
                            raise err(r, a, "no neighbouring chunk to exchange with")
                        if layout.chunks[nb].rank != a.peer or a.peer == r:
                            raise err(r, a, f"peer should be rank {layout.chunks[nb].rank}")
                        if a.op is Op.SEND_F and (a.chunk, a.mb) not in f_done:
                            raise err(r, a, "sends an activation before its forward ran")
                        if a.op is Op.SEND_B and (a.chunk, a.mb) not in b_done:
                            raise err(r, a, "sends a gradient before its backward ran")
                        label = _label(layout, a)
                        lst = sends[(r, a.peer)] if a.op in (Op.SEND_F, Op.SEND_B) else recvs[(a.peer, r)]
                        posted_idx[r].append((a, len(lst)))
                        if a.op in (Op.RECV_F, Op.RECV_B):
                            outstanding[r][label] = (a, len(lst))
                        lst.append((label, clock[r]))
                    posted[r] = True
                    post_time[r] = clock[r]
                    progress = True
                # wait: for the whole batch (strict), or for the receives this compute consumes
                ready_at = post_time[r]
                blocked = False
                if strict:
                    waits = posted_idx[r]
                else:
                    waits = [outstanding[r][k] for k in _consumes(layout, comp, r) if k in outstanding[r]]
                for a, idx in waits:
                    cp = counterpart(r, a, idx)
                    if cp is None:
                        blocked = True
                        break
                    if cp[0] != _label(layout, a):
                        raise err(r, a, f"matched with a message labelled {cp[0]} (kind, chunk, mb) instead")
                    ready_at = max(ready_at, cp[1])
                if blocked:
                    break
                for a, _ in waits:
                    if a.op in (Op.RECV_F, Op.RECV_B):
                        outstanding[r].pop(_label(layout, a))
                    if a.op is Op.RECV_F:
                        got_act.add((a.chunk, a.mb))
                    elif a.op is Op.RECV_B:
                        got_grad.add((a.chunk, a.mb))
                start = max(clock[r], ready_at)
                if comp is not None:
                    for part in comp.parts:
                        if part.op is Op.F:
                            do_f(r, comp, part.chunk, part.mb)
                        if part.op in (Op.B, Op.BW):
                            do_b(r, comp, part.chunk, part.mb)
                        if part.op in (Op.W, Op.BW):
                            do_w(r, comp, part.chunk, part.mb)
                    dur = costs.duration(comp)
                    timeline.append(TimedAction(r, comp, start, start + dur))
                    busy[r] += dur
                    clock[r] = start + dur
                else:
                    clock[r] = start
                pc[r] += 1
                posted[r] = False
                progress = True
    stuck = [r for r in range(pp) if pc[r] < len(steps[r])]
    leftover = {r: sorted(outstanding[r]) for r in range(pp) if outstanding[r] and not stuck}
    if leftover:
        raise ScheduleError(f"schedule {schedule.name!r}: receives never consumed: {leftover}")
    if stuck:
        where = "; ".join(
            f"rank {r} waits at step {pc[r]} ({steps[r][pc[r]][1] or 'final batch'}) on "
            + ", ".join(str(a) for a, i in posted_idx[r] if counterpart(r, a, i) is None)
            for r in stuck
        )
        raise ScheduleError(
            f"schedule {schedule.name!r} (pp={pp}, mb={schedule.num_microbatches}) deadlocks: {where}"
        )
    for key in set(sends) | set(recvs):
        if len(sends[key]) != len(recvs[key]):
            raise ScheduleError(
                f"schedule {schedule.name!r}: rank {key[0]} sends {len(sends[key])} messages to rank {key[1]}, "
                f"which receives {len(recvs[key])}"
            )
    for c, info in enumerate(layout.chunks):
        for m in layout.path_microbatches[info.path]:
            if (c, m) not in f_done:
                raise ScheduleError(f"schedule {schedule.name!r}: F{m}c{c} missing on rank {info.rank}")
            if (c, m) not in b_done:
                raise ScheduleError(
                    f"schedule {schedule.name!r}: backward B{m}c{c} missing on rank {info.rank}"
                )
            if (c, m) not in w_done:
                raise ScheduleError(
                    f"schedule {schedule.name!r}: weight gradient W{m}c{c} missing on rank {info.rank}"
                )
    makespan = max(clock) if clock else 0.0
    num_p2p = sum(len(v) for v in sends.values())
    return SimResult(timeline=timeline, makespan=makespan, busy=busy, peak_live=peak, num_p2p=num_p2p)


def validate(schedule: Schedule) -> SimResult:
    """Prove `schedule` complete and deadlock-free (strict waiting model); raises ScheduleError."""
    return simulate(schedule, strict=True)


def check_spec(name: str, *, pps: Sequence[int] = (1, 2, 3, 4), max_microbatches: int | None = None) -> int:
    """Prove the registry entry of schedule `name` consistent with its generator; returns how many
    schedules it validated.

    For every pp in `pps` and every M from 1 to `max_microbatches` (default 3 pp + 2): the
    generator builds a schedule iff `validate_microbatches` (the spec's rule, which the configs and
    the batch ramp use) accepts (pp, M); every schedule it builds passes `validate` (complete,
    deadlock-free), names itself `name`, has pp x pieces_per_rank model pieces, and contains
    F&B actions only when the spec declares `has_fb_pairs`. Raises ScheduleError otherwise.
    """
    from megads.pipeline.schedules import build_schedule, get_schedule, validate_microbatches

    spec = get_schedule(name)
    checked = 0
    for pp in pps:
        for m in range(1, (max_microbatches or 3 * pp + 2) + 1):
            try:
                validate_microbatches(name, pp=pp, num_microbatches=m)
                accepted: str | None = None
            except ValueError as e:
                accepted = str(e)
            try:
                sched = build_schedule(name, pp=pp, num_microbatches=m)
            except ValueError as e:
                if accepted is None:
                    raise ScheduleError(
                        f"schedule {name!r}: the registry accepts pp={pp}, M={m} but the generator refuses: {e}"
                    ) from e
                continue
            if accepted is not None:
                raise ScheduleError(
                    f"schedule {name!r}: the generator builds pp={pp}, M={m} but the registry refuses it "
                    f"({accepted}); fix min_microbatches / microbatch_multiple / min_pp / pp_multiple"
                )
            if sched.name != name or sched.pp != pp or sched.num_microbatches != m:
                raise ScheduleError(
                    f"schedule {name!r}: the generator returned {sched.name!r} with pp={sched.pp}, "
                    f"M={sched.num_microbatches} for pp={pp}, M={m}"
                )
            validate(sched)
            if sched.layout.num_pieces != pp * spec.pieces_per_rank:
                raise ScheduleError(
                    f"schedule {name!r} (pp={pp}, M={m}): the layout has {sched.layout.num_pieces} pieces, "
                    f"the registry says pieces_per_rank={spec.pieces_per_rank} (x pp = {pp * spec.pieces_per_rank})"
                )
            if not spec.has_fb_pairs and any(a.op is Op.FB for acts in sched.actions for a in acts):
                raise ScheduleError(
                    f"schedule {name!r} (pp={pp}, M={m}) emits F&B actions; register it with has_fb_pairs=True"
                )
            checked += 1
    return checked
