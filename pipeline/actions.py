"""The schedule language: placements of model chunks on ranks, and per-rank action lists.

A pipeline schedule is, for every pipeline rank, an ordered list of `Action`s. Compute actions
name a *chunk* (a virtual stage: one piece of the model placed on one rank, on one path through
the pipeline) and a micro-batch:

    F    forward of (chunk, mb)
    B    input-gradient backward of (chunk, mb); keeps what W needs
    W    weight-gradient backward of (chunk, mb)
    BW   full backward of (chunk, mb) (B then W at once)
    FB   overlapped pair: forward of (chunk, mb) and full backward of (chunk2, mb2)

and communication actions move one tensor between ranks:

    SEND_F / RECV_F   the output activation of chunk c (sent) = the input of next(c) (received)
    SEND_B / RECV_B   the input gradient of chunk c (sent) = the output gradient of prev(c)

Labels of communication actions name the chunk on the rank that executes them: `SEND_F(c, m)`
on rank r sends F(c, m)'s output to the rank of next(c), where it is received as
`RECV_F(next(c), m)`. `SEND_B(c, m)` sends B(c, m)'s input gradient to the rank of prev(c),
received there as `RECV_B(prev(c), m)`.

The *layout* says where chunks live: `Layout.chunks[c]` gives the rank, the model piece (the
parameters: two chunks share a piece when the model is replicated, as in DualPipe), and the
previous / next chunk on its path. A path is a chain of chunks that a set of micro-batches
flows through: one path for 1F1B / interleaved / ZB1P / DualPipeV, two for DualPipe.

Schedule generators (`pipeline.schedules`) write the compute order of each rank;
`add_communication` lowers it into the full language: every SEND right after the compute that
produces its tensor, every RECV at the first step boundary (in the ideal timing) after the
tensor exists, so both ends of each message post it at matching points. The runtime queues communication actions and commits them as one batch of P2P operations at
the next compute action, so one "step" of a rank is (a batch of sends/receives, one compute).
`pipeline.validate` proves such a list complete and deadlock-free before it runs.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field


class Op(str, enum.Enum):
    """Kinds of actions."""

    F = "F"
    B = "B"
    W = "W"
    BW = "BW"
    FB = "FB"
    SEND_F = "SEND_F"
    RECV_F = "RECV_F"
    SEND_B = "SEND_B"
    RECV_B = "RECV_B"

    @property
    def is_compute(self) -> bool:
        return self in (Op.F, Op.B, Op.W, Op.BW, Op.FB)

    @property
    def is_comm(self) -> bool:
        return not self.is_compute


@dataclass(frozen=True)
class Action:
    """One action of one rank.

    `chunk`/`mb` name the forward part for FB and the only part otherwise; `chunk2`/`mb2` name
    the backward part of an FB pair. `peer` is the pipeline rank at the other end of a SEND/RECV.
    """

    op: Op
    chunk: int
    mb: int
    peer: int = -1
    chunk2: int = -1
    mb2: int = -1

    def __str__(self) -> str:
        if self.op is Op.FB:
            return f"F{self.mb}c{self.chunk}&B{self.mb2}c{self.chunk2}"
        if self.op.is_comm:
            return f"{self.op.value}{self.mb}c{self.chunk}@{self.peer}"
        return f"{self.op.value}{self.mb}c{self.chunk}"

    @property
    def parts(self) -> tuple[Action, ...]:
        """The single-chunk computes this action runs, in order: (F, BW) for an F&B pair, else itself.

        Every consumer (communication lowering, ideal timing, validator, runtime) reads F&B
        through this: the F part needs its input activation, the BW part its output gradient.
        """
        if self.op is Op.FB:
            return (Action(Op.F, self.chunk, self.mb), Action(Op.BW, self.chunk2, self.mb2))
        return (self,)

    def short(self) -> str:
        """Compact label for timelines: op and micro-batch (chunk as a suffix letter)."""
        if self.op is Op.FB:
            return f"F{self.mb}B{self.mb2}"
        return f"{self.op.value}{self.mb}"


@dataclass(frozen=True)
class Costs:
    """Durations of compute actions, in any time unit: the one cost model of `pipeline`.

    Used by `ideal_times` (where `add_communication` places messages), by
    `pipeline.validate.simulate` (timelines, bubbles) and by the benchmarks. BW is B + W;
    `FB` defaults to F + B + W (no overlap).
    """

    F: float = 1.0
    B: float = 1.0
    W: float = 1.0
    FB: float | None = None

    def of(self, op: Op) -> float:
        if op is Op.F:
            return self.F
        if op is Op.B:
            return self.B
        if op is Op.W:
            return self.W
        if op is Op.BW:
            return self.B + self.W
        if op is Op.FB:
            return self.FB if self.FB is not None else self.F + self.B + self.W
        return 0.0

    def duration(self, action: Action) -> float:
        """Duration of one compute action: `of(action.op)` here; a subclass may make it depend on
        the chunks the action runs (the capacity planner's per-piece costs)."""
        return self.of(action.op)


def F(chunk: int, mb: int) -> Action:
    return Action(Op.F, chunk, mb)


def B(chunk: int, mb: int) -> Action:
    return Action(Op.B, chunk, mb)


def W(chunk: int, mb: int) -> Action:
    return Action(Op.W, chunk, mb)


def BW(chunk: int, mb: int) -> Action:
    return Action(Op.BW, chunk, mb)


def FB(f_chunk: int, f_mb: int, b_chunk: int, b_mb: int) -> Action:
    return Action(Op.FB, f_chunk, f_mb, chunk2=b_chunk, mb2=b_mb)


@dataclass(frozen=True)
class ChunkInfo:
    """Where one chunk (virtual stage) lives and what surrounds it on its path."""

    rank: int
    piece: int
    path: int
    prev: int | None
    next: int | None

    @property
    def is_first(self) -> bool:
        """Reads the micro-batch input."""
        return self.prev is None

    @property
    def is_last(self) -> bool:
        """Produces the micro-batch loss."""
        return self.next is None


@dataclass(frozen=True)
class Layout:
    """Placement of chunks on `pp` ranks and the micro-batches of each path."""

    pp: int
    num_pieces: int
    chunks: tuple[ChunkInfo, ...]
    paths: tuple[tuple[int, ...], ...]
    path_microbatches: tuple[tuple[int, ...], ...]

    def chunks_on(self, rank: int) -> list[int]:
        return [c for c, info in enumerate(self.chunks) if info.rank == rank]

    def path_of_mb(self, mb: int) -> int:
        for p, mbs in enumerate(self.path_microbatches):
            if mb in mbs:
                return p
        raise KeyError(mb)

    def piece_ranks(self, piece: int) -> list[int]:
        """Ranks holding a replica of `piece` (two for DualPipe, one otherwise)."""
        return sorted({info.rank for info in self.chunks if info.piece == piece})

    def first_chunk_on_rank(self, rank: int) -> bool:
        return any(self.chunks[c].is_first for c in self.chunks_on(rank))


def make_layout(
    pp: int, *, paths: Sequence[Sequence[tuple[int, int]]], path_microbatches: Sequence[Sequence[int]]
) -> Layout:
    """Build a layout from paths given as lists of (rank, piece) along the data flow."""
    chunks: list[ChunkInfo] = []
    path_ids: list[tuple[int, ...]] = []
    for p, path in enumerate(paths):
        ids = list(range(len(chunks), len(chunks) + len(path)))
        for i, (rank, piece) in enumerate(path):
            chunks.append(
                ChunkInfo(
                    rank=rank,
                    piece=piece,
                    path=p,
                    prev=ids[i - 1] if i > 0 else None,
                    next=ids[i + 1] if i + 1 < len(path) else None,
                )
            )
        path_ids.append(tuple(ids))
    num_pieces = max(info.piece for info in chunks) + 1
    return Layout(
        pp=pp,
        num_pieces=num_pieces,
        chunks=tuple(chunks),
        paths=tuple(path_ids),
        path_microbatches=tuple(tuple(m) for m in path_microbatches),
    )


@dataclass(frozen=True)
class Schedule:
    """A named schedule: layout, micro-batch count and the action list of every rank."""

    name: str
    layout: Layout
    num_microbatches: int
    actions: tuple[tuple[Action, ...], ...]
    meta: dict[str, object] = field(default_factory=dict, compare=False)

    @property
    def pp(self) -> int:
        return self.layout.pp

    def compute_only(self) -> list[list[Action]]:
        return [[a for a in acts if a.op.is_compute] for acts in self.actions]

    def replace_actions(self, actions: Sequence[Sequence[Action]]) -> Schedule:
        return Schedule(
            self.name, self.layout, self.num_microbatches, tuple(tuple(a) for a in actions), dict(self.meta)
        )


def _needs_and_produces(layout: Layout, act: Action) -> tuple[list[Action], list[Action]]:
    """The RECV actions a compute action needs before it and the SENDs it enables after it."""
    recvs: list[Action] = []
    sends: list[Action] = []
    for part in act.parts:
        op, c, m = part.op, part.chunk, part.mb
        if op is Op.W:  # reads and sends nothing
            continue
        info = layout.chunks[c]
        if op is Op.F:
            if info.prev is not None and layout.chunks[info.prev].rank != info.rank:
                recvs.append(Action(Op.RECV_F, c, m, peer=layout.chunks[info.prev].rank))
            if info.next is not None and layout.chunks[info.next].rank != info.rank:
                sends.append(Action(Op.SEND_F, c, m, peer=layout.chunks[info.next].rank))
        else:  # B or BW
            if info.next is not None and layout.chunks[info.next].rank != info.rank:
                recvs.append(Action(Op.RECV_B, c, m, peer=layout.chunks[info.next].rank))
            if info.prev is not None and layout.chunks[info.prev].rank != info.rank:
                sends.append(Action(Op.SEND_B, c, m, peer=layout.chunks[info.prev].rank))
    return recvs, sends


def ideal_times(
    layout: Layout, *, compute: Sequence[Sequence[Action]], costs: Costs | None = None
) -> list[list[tuple[float, float]]]:
    """(start, end) of every compute action when only data dependencies and rank order count.

    Communication is free and instantaneous here; this is the time model used to place the
    SEND/RECV actions, and the lower bound any real run approaches. Durations are `costs`
    (the one cost model, shared with `pipeline.validate.simulate`; unit costs by default).
    """
    costs = costs or Costs()
    pp = layout.pp
    times: list[list[tuple[float, float]]] = [[] for _ in range(pp)]
    f_end: dict[tuple[int, int], float] = {}
    b_end: dict[tuple[int, int], float] = {}
    pos = [0] * pp
    clock = [0.0] * pp

    def ready(op: Op, c: int, m: int) -> float | None:
        info = layout.chunks[c]
        if op is Op.F:
            return 0.0 if info.prev is None else f_end.get((info.prev, m))
        if op is Op.W:
            return b_end.get((c, m))
        if info.next is None:
            return f_end.get((c, m))
        return b_end.get((info.next, m))

    progress = True
    while progress:
        progress = False
        for r in range(pp):
            while pos[r] < len(compute[r]):
                act = compute[r][pos[r]]
                deps = [ready(p.op, p.chunk, p.mb) for p in act.parts]
                if any(d is None for d in deps):
                    break
                start = max([clock[r]] + [d for d in deps if d is not None])
                end = start + costs.of(act.op)
                for p in act.parts:
                    if p.op is Op.F:
                        f_end[(p.chunk, p.mb)] = end
                    elif p.op in (Op.B, Op.BW):
                        b_end[(p.chunk, p.mb)] = end
                times[r].append((start, end))
                clock[r] = end
                pos[r] += 1
                progress = True
    if any(pos[r] < len(compute[r]) for r in range(pp)):
        stuck = {r: str(compute[r][pos[r]]) for r in range(pp) if pos[r] < len(compute[r])}
        raise ValueError(f"compute order has a dependency cycle or a missing producer; stuck at {stuck}")
    return times


def add_communication(
    layout: Layout, *, compute: Sequence[Sequence[Action]], costs: Costs | None = None
) -> list[list[Action]]:
    """Lower compute-only lists into the full language by inserting SEND and RECV actions.

    Placement rule, from the ideal timing of `ideal_times`: a message produced at time e by a
    compute on rank a is sent in the batch of a's next compute (right after its producer), and
    received on rank b in the batch of b's first compute that starts at or after e (never later
    than its consumer). Both ends thus post the message at the first step boundary after it
    exists, which keeps the batches of every pair of ranks in a consistent order: no cycle of
    batches waiting on each other, and per-channel FIFO order equal to production order.
    `pipeline.validate` re-checks the result under the strict waiting model.
    """
    times = ideal_times(layout, compute=compute, costs=costs)
    pp = layout.pp
    before: list[list[list[tuple[float, int, Action]]]] = [[[] for _ in range(len(c) + 1)] for c in compute]
    after: list[list[list[Action]]] = [[[] for _ in range(len(c))] for c in compute]
    consumer_pos: dict[tuple[Op, int, int], tuple[int, int]] = {}
    for r in range(pp):
        for i, act in enumerate(compute[r]):
            recvs, _ = _needs_and_produces(layout, act)
            for rv in recvs:
                consumer_pos[(rv.op, rv.chunk, rv.mb)] = (r, i)
    seq = 0
    for a_rank in range(pp):
        for i, act in enumerate(compute[a_rank]):
            _, sends = _needs_and_produces(layout, act)
            end = times[a_rank][i][1]
            for sd in sends:
                after[a_rank][i].append(sd)
                info = layout.chunks[sd.chunk]
                if sd.op is Op.SEND_F:
                    assert info.next is not None
                    key = (Op.RECV_F, info.next, sd.mb)
                else:
                    assert info.prev is not None
                    key = (Op.RECV_B, info.prev, sd.mb)
                b_rank, cpos = consumer_pos[key]
                j = next((k for k, (s, _) in enumerate(times[b_rank]) if s >= end), len(compute[b_rank]))
                j = min(j, cpos)
                seq += 1
                before[b_rank][j].append((end, seq, Action(key[0], key[1], key[2], peer=a_rank)))
    out: list[list[Action]] = []
    for r in range(pp):
        lowered: list[Action] = []
        for i, act in enumerate(compute[r]):
            lowered.extend(a for _, _, a in sorted(before[r][i], key=lambda t: (t[0], t[1])))
            lowered.append(act)
            lowered.extend(after[r][i])
        lowered.extend(a for _, _, a in sorted(before[r][len(compute[r])], key=lambda t: (t[0], t[1])))
        out.append(lowered)
    return out
