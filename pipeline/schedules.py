"""Schedule generators: 1F1B, interleaved 1F1B, ZB1P, DualPipe and DualPipeV.

Each generator writes the *compute order* of every rank for (pp, num_microbatches) on its layout,
then `add_communication` lowers it into the full action language (see `pipeline.actions`).

Every schedule is registered once, at the bottom of this file, as a `ScheduleSpec` (generator,
micro-batch rule, pp rule, pieces per rank, F&B pairs, analytic bubble, one-line description);
the configs, the trainer, the validator (`check_spec`), the benchmarks and the printer read the
registry (`get_schedule`, `schedule_names`), so a new schedule is one `register_schedule` call.
Analytic bubbles (F forward chunk, B full backward, W weight backward, F&B an overlapped pair;
the table of SPEC.md / the DualPipe README, "PP" = number of pipeline stages):

    1f1b         (PP-1)(F+B)                  PP = pp, 1 chunk per rank
    interleaved  (pp-1)(F+B)                  per chunk; a chunk is 1/v of a stage, hence Megatron's 1/v
    zb1p         (PP-1)(F+B-2W)               PP = pp, 1 chunk per rank, B/W split
    dualpipe     (PP/2-1)(F&B+B-3W)           PP = pp (even), 2 chunks (replicas) per rank
    dualpipev    (PP/2-1)(F&B+B-3W)           PP = 2 pp stages, V-shaped on pp ranks

Micro-batch numbering: one path carries micro-batches 0..M-1; DualPipe's forward direction
(chunks 0..pp-1 on ranks 0..pp-1) carries 0..M/2-1 and its reverse direction (chunks pp..2pp-1 on
ranks pp-1..0) carries M/2..M-1.

DualPipe / DualPipeV follow the eight labelled phases of deepseek-ai/DualPipe (warm-up forwards,
paired forwards, zero-bubble backward+weight+forward, the overlapped F&B main loop, the
drain, and the trailing weight-gradient work), with every phase length an explicit formula.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megads.pipeline.actions import (
    BW,
    FB,
    Action,
    B,
    F,
    Layout,
    Schedule,
    W,
    add_communication,
    make_layout,
)

# ----------------------------------------------------------------------------------------------
# layouts


def linear_layout(pp: int, *, num_microbatches: int, virtual: int = 1) -> Layout:
    """pp*virtual chunks in a line; chunk s on rank s % pp (Megatron's interleaving for virtual > 1)."""
    n = pp * virtual
    return make_layout(
        pp, paths=[[(s % pp, s) for s in range(n)]], path_microbatches=[range(num_microbatches)]
    )


def v_layout(pp: int, *, num_microbatches: int) -> Layout:
    """2*pp chunks down the ranks and back up: chunk s on rank s for s < pp, else 2pp-1-s."""
    path = [(s if s < pp else 2 * pp - 1 - s, s) for s in range(2 * pp)]
    return make_layout(pp, paths=[path], path_microbatches=[range(num_microbatches)])


def bidirectional_layout(pp: int, *, num_microbatches: int) -> Layout:
    """Two directions over the same pp pieces: forward piece s on rank s, reverse on rank pp-1-s."""
    half = num_microbatches // 2
    return make_layout(
        pp,
        paths=[[(s, s) for s in range(pp)], [(pp - 1 - s, s) for s in range(pp)]],
        path_microbatches=[range(half), range(half, num_microbatches)],
    )


def _finish(
    name: str, *, layout: Layout, num_microbatches: int, compute: list[list[Action]], **meta: object
) -> Schedule:
    actions = add_communication(layout, compute=compute)
    return Schedule(name, layout, num_microbatches, tuple(tuple(a) for a in actions), dict(meta))


def _check_common(name: str, *, pp: int, num_microbatches: int) -> None:
    if pp < 1:
        raise ValueError(f"schedule {name!r}: pp={pp}; parallel.pp must be at least 1")
    if num_microbatches < 1:
        raise ValueError(f"schedule {name!r}: num_microbatches={num_microbatches}; it must be at least 1")


# ----------------------------------------------------------------------------------------------
# generators


def one_f_one_b(pp: int, *, num_microbatches: int) -> Schedule:
    """Classic 1F1B: rank r warms up with pp-1-r forwards, then alternates F and full backward."""
    _check_common("1f1b", pp=pp, num_microbatches=num_microbatches)
    m_total = num_microbatches
    compute: list[list[Action]] = []
    for r in range(pp):
        warm = min(pp - 1 - r, m_total)
        acts = [F(r, m) for m in range(warm)]
        for i in range(m_total - warm):
            acts += [F(r, warm + i), BW(r, i)]
        acts += [BW(r, m) for m in range(m_total - warm, m_total)]
        compute.append(acts)
    return _finish(
        "1f1b", layout=linear_layout(pp, num_microbatches=m_total), num_microbatches=m_total, compute=compute
    )


def interleaved(pp: int, *, num_microbatches: int, virtual: int = 2) -> Schedule:
    """Interleaved 1F1B (virtual stages): `virtual` chunks per rank, micro-batches in rounds of pp."""
    _check_common("interleaved", pp=pp, num_microbatches=num_microbatches)
    if virtual < 2:
        raise ValueError(
            f"schedule 'interleaved': virtual={virtual}; use at least 2 chunks per rank (or '1f1b')"
        )
    if pp < 2 or num_microbatches % pp != 0:
        raise ValueError(
            f"schedule 'interleaved': pp={pp}, num_microbatches={num_microbatches}; it needs pp >= 2 and "
            f"num_microbatches a positive multiple of pp (e.g. {pp * max(1, num_microbatches // max(pp, 1))})"
        )
    m_total = num_microbatches
    units = m_total * virtual

    def unit(i: int, *, backward: bool, r: int) -> tuple[int, int]:
        k = (i // pp) % virtual
        if backward:
            k = virtual - 1 - k
        mb = (i // (pp * virtual)) * pp + i % pp
        return k * pp + r, mb

    compute: list[list[Action]] = []
    for r in range(pp):
        warm = min((pp - r - 1) * 2 + (virtual - 1) * pp, units)
        acts = [F(*unit(i, backward=False, r=r)) for i in range(warm)]
        for i in range(units - warm):
            acts += [F(*unit(warm + i, backward=False, r=r)), BW(*unit(i, backward=True, r=r))]
        acts += [BW(*unit(i, backward=True, r=r)) for i in range(units - warm, units)]
        compute.append(acts)
    layout = linear_layout(pp, num_microbatches=m_total, virtual=virtual)
    return _finish("interleaved", layout=layout, num_microbatches=m_total, compute=compute, virtual=virtual)


def zb1p(pp: int, *, num_microbatches: int) -> Schedule:
    """ZB-H1: 1F1B with B/W split; rank r holds back r weight-gradient steps to fill its drain."""
    _check_common("zb1p", pp=pp, num_microbatches=num_microbatches)
    m_total = num_microbatches
    compute: list[list[Action]] = []
    for r in range(pp):
        warm = min(pp - 1 - r, m_total)
        acts = [F(r, m) for m in range(warm)]
        pending: deque[int] = deque()
        for i in range(m_total - warm):
            acts += [F(r, warm + i), B(r, i)]
            pending.append(i)
            if len(pending) > r:
                acts.append(W(r, pending.popleft()))
        for m in range(m_total - warm, m_total):
            acts.append(B(r, m))
            pending.append(m)
            if len(pending) > r:
                acts.append(W(r, pending.popleft()))
        acts += [W(r, m) for m in pending]
        compute.append(acts)
    return _finish(
        "zb1p", layout=linear_layout(pp, num_microbatches=m_total), num_microbatches=m_total, compute=compute
    )


def _dual_rank(
    *,
    half_ranks: int,
    h: int,
    m_dir: int,
    chunks: tuple[int, int],
    mb_offset: tuple[int, int],
    split_first_main: bool,
) -> list[Action]:
    """Compute order of one rank of DualPipe (h = half rank) or DualPipeV (h = rank).

    phase 0 is the chunk whose micro-batches this rank sees first (entering from its own end),
    phase 1 the other one; `chunks[p]` and `mb_offset[p]` translate a phase and a per-phase
    counter into a chunk id and a micro-batch id.
    """
    acts: list[Action] = []
    nf = [0, 0]
    nb = [0, 0]
    wq: deque[tuple[int, int]] = deque()

    def f(p: int) -> tuple[int, int]:
        nf[p] += 1
        return chunks[p], mb_offset[p] + nf[p] - 1

    def b(p: int) -> tuple[int, int]:
        nb[p] += 1
        return chunks[p], mb_offset[p] + nb[p] - 1

    def fwd(p: int) -> None:
        acts.append(F(*f(p)))

    def bwd(p: int, *, zero_bubble: bool) -> None:
        c, m = b(p)
        if zero_bubble:
            acts.append(B(c, m))
            wq.append((c, m))
        else:
            acts.append(BW(c, m))

    def wgt() -> None:
        acts.append(W(*wq.popleft()))

    def fb(pf: int, pb: int) -> None:
        fc, fm = f(pf)
        bc, bm = b(pb)
        acts.append(FB(fc, fm, bc, bm))

    tail = half_ranks - h - 1
    # 1: warm-up forwards of phase 0
    for _ in range(2 * tail):
        fwd(0)
    # 2: forwards of both phases
    for _ in range(h + 1):
        fwd(0)
        fwd(1)
    # 3: zero-bubble backward, its weight gradient, next forward of phase 1
    for _ in range(tail):
        bwd(1, zero_bubble=True)
        wgt()
        fwd(1)
    # 4: main loop, two overlapped pairs per iteration
    for i in range(m_dir - 2 * half_ranks + h + 1):
        if i == 0 and split_first_main:
            fwd(0)
            bwd(1, zero_bubble=False)
        else:
            fb(0, 1)
        fb(1, 0)
    # 5: drain phase-1 backward with overlapped pairs
    for _ in range(tail):
        bwd(1, zero_bubble=False)
        fb(1, 0)
    # 6: backward of both phases; the second half uses the B/W split
    zero_bubble = False
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            zero_bubble = True
        bwd(1, zero_bubble=zero_bubble)
        if i == (h + 1) // 2 and h % 2 == 0:
            zero_bubble = True
        bwd(0, zero_bubble=zero_bubble)
    # 7: weight gradients interleaved with the last phase-0 backwards
    for _ in range(tail):
        wgt()
        bwd(0, zero_bubble=True)
    # 8: remaining weight gradients
    while wq:
        wgt()
    assert nf == [m_dir, m_dir] and nb == [m_dir, m_dir], (nf, nb)
    return acts


def dualpipev(pp: int, *, num_microbatches: int) -> Schedule:
    """DualPipeV: V-shaped placement of 2*pp chunks on pp ranks, embedding and head on rank 0."""
    _check_common("dualpipev", pp=pp, num_microbatches=num_microbatches)
    if pp < 2 or num_microbatches < 2 * pp:
        raise ValueError(
            f"schedule 'dualpipev': pp={pp}, num_microbatches={num_microbatches}; it needs pp >= 2 and "
            f"num_microbatches >= 2*pp = {2 * max(pp, 2)}"
        )
    compute = [
        _dual_rank(
            half_ranks=pp,
            h=r,
            m_dir=num_microbatches,
            chunks=(r, 2 * pp - 1 - r),
            mb_offset=(0, 0),
            split_first_main=r == pp - 1,
        )
        for r in range(pp)
    ]
    layout = v_layout(pp, num_microbatches=num_microbatches)
    return _finish("dualpipev", layout=layout, num_microbatches=num_microbatches, compute=compute)


def dualpipe(pp: int, *, num_microbatches: int) -> Schedule:
    """DualPipe: two directions over replicated pieces; rank r holds piece r and piece pp-1-r."""
    _check_common("dualpipe", pp=pp, num_microbatches=num_microbatches)
    if pp < 2 or pp % 2 != 0 or num_microbatches % 2 != 0 or num_microbatches < 2 * pp:
        raise ValueError(
            f"schedule 'dualpipe': pp={pp}, num_microbatches={num_microbatches}; it needs an even pp >= 2 and "
            f"an even num_microbatches >= 2*pp (half enter from each end)"
        )
    half = num_microbatches // 2
    half_ranks = pp // 2
    compute = []
    for r in range(pp):
        h = min(r, pp - 1 - r)
        fwd_dir_chunk, rev_dir_chunk = r, pp + (pp - 1 - r)
        if r < half_ranks:
            chunks, offs = (fwd_dir_chunk, rev_dir_chunk), (0, half)
        else:
            chunks, offs = (rev_dir_chunk, fwd_dir_chunk), (half, 0)
        compute.append(
            _dual_rank(
                half_ranks=half_ranks,
                h=h,
                m_dir=half,
                chunks=chunks,
                mb_offset=offs,
                split_first_main=h == half_ranks - 1,
            )
        )
    layout = bidirectional_layout(pp, num_microbatches=num_microbatches)
    return _finish("dualpipe", layout=layout, num_microbatches=num_microbatches, compute=compute)


# ----------------------------------------------------------------------------------------------
# the registry: every schedule once, with everything the rest of megads asks about it

_REGISTRY: dict[str, ScheduleSpec] = {}


def _one(pp: int) -> int:
    return 1


@dataclass(frozen=True)
class ScheduleSpec:
    """One schedule, as every consumer sees it (configs, trainer, validator, benchmarks, docs).

    `name` runs on pp ranks with M micro-batches iff pp >= min_pp, pp % pp_multiple == 0,
    M >= min_microbatches(pp) and M % microbatch_multiple(pp) == 0; `generator` must accept
    exactly those (`pipeline.validate.check_spec` proves it on a grid). `pieces_per_rank` is the
    number of distinct model pieces one rank holds (replicas count once: DualPipe holds 1).
    `bubble(pp, F, B, W, FB)` is the analytic per-rank bubble (B the full backward). With
    `has_fb_pairs` the schedule emits overlapped F&B actions, which a stage may interleave at
    sub-module granularity (the trainer then picks the overlapping executor).
    """

    name: str
    generator: Callable[..., Schedule]  # generator(pp, *, num_microbatches, **options) -> Schedule
    min_microbatches: Callable[[int], int]  # pp -> the smallest M
    bubble: Callable[[int, float, float, float, float], float]  # (pp, F, B, W, FB) -> bubble per rank
    description: str  # one line, for --help texts and listings
    microbatch_multiple: Callable[[int], int] = _one  # pp -> the step between accepted Ms
    min_pp: int = 1
    pp_multiple: int = 1
    pieces_per_rank: int = 1
    has_fb_pairs: bool = False


def register_schedule(spec: ScheduleSpec, *, replace: bool = False) -> ScheduleSpec:
    """Add `spec` to the registry (the one edit a new schedule needs); returns it.

    A second spec under a taken name is refused unless `replace=True`.
    """
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"schedule {spec.name!r} is already registered; pass replace=True to override it")
    if spec.min_pp < 1 or spec.pp_multiple < 1 or spec.pieces_per_rank < 1:
        raise ValueError(
            f"schedule {spec.name!r}: min_pp={spec.min_pp}, pp_multiple={spec.pp_multiple} and "
            f"pieces_per_rank={spec.pieces_per_rank} must be >= 1"
        )
    _REGISTRY[spec.name] = spec
    return spec


def unregister_schedule(name: str) -> None:
    """Remove `name` from the registry (for tests that register a schedule of their own)."""
    get_schedule(name)
    del _REGISTRY[name]


def schedule_names() -> tuple[str, ...]:
    """Names of every registered schedule, in registration order (the five built-ins first)."""
    return tuple(_REGISTRY)


def get_schedule(name: str) -> ScheduleSpec:
    """The spec of schedule `name`; ValueError naming the registered ones when there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"parallel.schedule={name!r} is unknown; choose one of {', '.join(_REGISTRY)}"
        ) from None


def min_microbatches(name: str, *, pp: int) -> int:
    """The smallest micro-batch count `name` accepts for `pp` ranks."""
    return get_schedule(name).min_microbatches(pp)


def microbatch_multiple(name: str, *, pp: int) -> int:
    """The step between the micro-batch counts `name` accepts for `pp` ranks.

    With `min_microbatches` it states each generator's rule: `name` runs M micro-batches iff
    M >= min_microbatches and M % microbatch_multiple == 0 (and the layout itself is valid:
    pp >= 2 for interleaved and the DualPipes, pp even for DualPipe; `validate_microbatches`).
    DualPipe splits M into two equal halves, one per direction; interleaved runs rounds of pp;
    DualPipeV, 1F1B and ZB1P take any count from their minimum on.
    """
    return get_schedule(name).microbatch_multiple(pp)


def validate_microbatches(name: str, *, pp: int, num_microbatches: int) -> None:
    """Raise ValueError (saying what would fit) unless `name` accepts pp ranks and M micro-batches.

    The same acceptance as the generators (tests/test_train_schedule.py checks they agree), without
    building the schedule: cheap for pp = 16 and hundreds of micro-batches.
    """
    spec = get_schedule(name)
    if pp < spec.min_pp or pp % spec.pp_multiple:
        if spec.pp_multiple == 2:
            need = f"an even pp >= {spec.min_pp}"
        elif spec.pp_multiple > 1:
            need = f"pp a multiple of {spec.pp_multiple}, >= {spec.min_pp}"
        else:
            need = f"pp >= {spec.min_pp}"
        raise ValueError(f"schedule {name!r}: pp={pp}; it needs {need}")
    lo, step = spec.min_microbatches(pp), spec.microbatch_multiple(pp)
    m = num_microbatches
    if m < lo or m % step:
        fit = max(lo, -(-m // step) * step)
        rule = f"at least {lo}" + (f" and a multiple of {step}" if step > 1 else "")
        raise ValueError(
            f"schedule {name!r}: pp={pp}, num_microbatches={m}; it needs {rule} micro-batches "
            f"(e.g. {fit})"
        )


def build_schedule(name: str, *, pp: int, num_microbatches: int, **options: Any) -> Schedule:
    """Generate registered schedule `name` for pp ranks and num_microbatches micro-batches.

    `options` go to the generator as they are (e.g. `virtual=3` for interleaved).
    """
    return get_schedule(name).generator(pp, num_microbatches=num_microbatches, **options)


def analytic_bubble(name: str, *, pp: int, F: float, B: float, W: float, FB: float) -> float:
    """The bubble formula of SPEC.md for schedule `name` on pp ranks; B is the FULL backward time.

    For DualPipeV the table's PP is the number of stages, 2*pp; F, B, W, FB are per chunk.
    """
    return get_schedule(name).bubble(pp, F, B, W, FB)


# ----------------------------------------------------------------------------------------------
# the built-ins (the module docstring's table)

register_schedule(ScheduleSpec(
    name="1f1b", generator=one_f_one_b, min_microbatches=_one,
    bubble=lambda pp, F, B, W, FB: (pp - 1) * (F + B),
    description="classic 1F1B: pp-1-r warm-up forwards, then one forward / one full backward",
))
register_schedule(ScheduleSpec(
    name="interleaved", generator=interleaved, min_microbatches=lambda pp: pp,
    microbatch_multiple=lambda pp: pp, min_pp=2, pieces_per_rank=2,
    bubble=lambda pp, F, B, W, FB: (pp - 1) * (F + B),  # per chunk: a chunk is 1/v of a stage
    description="interleaved 1F1B (Megatron virtual stages), 2 chunks per rank, M in rounds of pp",
))
register_schedule(ScheduleSpec(
    name="zb1p", generator=zb1p, min_microbatches=_one,
    bubble=lambda pp, F, B, W, FB: (pp - 1) * (F + B - 2 * W),
    description="ZB-H1: 1F1B with the weight gradient split off to fill the drain",
))
register_schedule(ScheduleSpec(
    name="dualpipe", generator=dualpipe, min_microbatches=lambda pp: 2 * pp,
    microbatch_multiple=lambda pp: 2, min_pp=2, pp_multiple=2, has_fb_pairs=True,
    bubble=lambda pp, F, B, W, FB: (pp / 2 - 1) * (FB + B - 3 * W),
    description="DualPipe: two directions over replicated pieces, overlapped F&B pairs",
))
register_schedule(ScheduleSpec(
    name="dualpipev", generator=dualpipev, min_microbatches=lambda pp: 2 * pp,
    min_pp=2, pieces_per_rank=2, has_fb_pairs=True,
    bubble=lambda pp, F, B, W, FB: (pp - 1) * (FB + B - 3 * W),  # the table's PP = 2 pp stages
    description="DualPipeV: V-shaped 2 pp chunks on pp ranks, embedding and head on rank 0",
))

SCHEDULES = schedule_names()  # the built-ins; `schedule_names()` also lists schedules registered later
