"""Schedule generators, validator and printer, without processes.

References: the bubble formulas of SPEC.md's DualPipe table (exact under unit costs and free
communication), the activation-memory column, and hand-made corruptions the validator must reject.
"""

from __future__ import annotations

import pytest
from megads.pipeline.actions import Op, Schedule
from megads.pipeline.render import text_timeline
from megads.pipeline.schedules import SCHEDULES, analytic_bubble, build_schedule, min_microbatches
from megads.pipeline.validate import Costs, ScheduleError, simulate, validate


def _counts(name: str, pp: int) -> list[int]:
    lo = min_microbatches(name, pp=pp)
    if name == "interleaved":
        return [lo, 2 * pp, 4 * pp]
    if name == "dualpipe":
        return [lo, lo + 2, 4 * pp]
    return sorted({lo, lo + 1, 2 * pp, 4 * pp + 1})


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_generated_schedules_validate(name: str, pp: int) -> None:
    for m in _counts(name, pp):
        sched = build_schedule(name, pp=pp, num_microbatches=m)
        res = validate(sched)
        computes = sum(1 for acts in sched.actions for a in acts if a.op.is_compute)
        assert computes == len(res.timeline)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4, 8])
def test_bubble_equals_table_formula(name: str, pp: int) -> None:
    """Unit costs (F=B=W=1 per chunk, F&B = F+B+W), free communication: the table's bubble exactly."""
    m = 4 * pp
    sched = build_schedule(name, pp=pp, num_microbatches=m)
    sim = simulate(sched, costs=Costs(1, 1, 1), strict=False)
    expected = analytic_bubble(name, pp=pp, F=1, B=2, W=1, FB=3)
    assert max(sim.bubble) == pytest.approx(expected)
    # with overlap (F&B = max(F, B+W) = 2) DualPipe's bubble shrinks by the formula too
    if name in ("dualpipe", "dualpipev"):
        sim2 = simulate(sched, costs=Costs(1, 1, 1, FB=2), strict=False)
        assert max(sim2.bubble) == pytest.approx(analytic_bubble(name, pp=pp, F=1, B=2, W=1, FB=2))


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_peak_activations_match_table(pp: int) -> None:
    """Peak live micro-batch activations per rank: PP for 1F1B/ZB1P, PP+1 for DualPipe (in chunks)."""
    m = 4 * pp
    assert simulate(build_schedule("1f1b", pp=pp, num_microbatches=m)).peak_live[0] == pp
    assert max(simulate(build_schedule("zb1p", pp=pp, num_microbatches=m)).peak_live) == pp
    assert max(simulate(build_schedule("dualpipe", pp=pp, num_microbatches=m)).peak_live) == pp + 1
    # DualPipeV has PP = 2*pp stages (chunks of half a rank's layers): 2*pp + 1 chunk activations
    assert max(simulate(build_schedule("dualpipev", pp=pp, num_microbatches=m)).peak_live) == 2 * pp + 1


@pytest.mark.parametrize(
    ("name", "pp", "m", "hint"),
    [
        ("dualpipe", 3, 6, "even pp"),
        ("dualpipe", 4, 7, "even num_microbatches"),
        ("dualpipe", 4, 6, ">= 2*pp"),
        ("dualpipev", 4, 7, ">= 2*pp = 8"),
        ("dualpipev", 1, 4, "pp >= 2"),
        ("interleaved", 4, 6, "multiple of pp"),
        ("interleaved", 1, 4, "pp >= 2"),
        ("1f1b", 4, 0, "at least 1"),
        ("zb1p", 0, 4, "at least 1"),
        ("gpipe", 4, 4, "choose one of"),
    ],
)
def test_invalid_combinations_are_refused(name: str, pp: int, m: int, hint: str) -> None:
    with pytest.raises(ValueError, match=hint.replace("*", r"\*")):
        build_schedule(name, pp=pp, num_microbatches=m)


def _with(sched: Schedule, rank: int, acts: list) -> Schedule:
    new = [list(a) for a in sched.actions]
    new[rank] = acts
    return sched.replace_actions(new)


@pytest.mark.parametrize("name", SCHEDULES)
def test_validator_rejects_any_removed_action(name: str) -> None:
    sched = build_schedule(name, pp=2, num_microbatches=min_microbatches(name, pp=2))
    validate(sched)
    for r in range(sched.pp):
        acts = list(sched.actions[r])
        for i in range(len(acts)):
            with pytest.raises(ScheduleError):
                validate(_with(sched, r, acts[:i] + acts[i + 1 :]))


@pytest.mark.parametrize("name", SCHEDULES)
def test_validator_rejects_swaps(name: str) -> None:
    sched = build_schedule(name, pp=4, num_microbatches=min_microbatches(name, pp=4))
    swapped = 0
    for r in range(sched.pp):
        acts = list(sched.actions[r])
        for i, a in enumerate(acts):
            # a forward swapped with the backward of the same (chunk, mb)
            j = next(
                (k for k, f in enumerate(acts) if f.op is Op.F and (f.chunk, f.mb) == (a.chunk, a.mb)), None
            )
            if a.op in (Op.B, Op.BW) and j is not None:
                bad = list(acts)
                bad[i], bad[j] = bad[j], bad[i]
                with pytest.raises(ScheduleError, match="before its forward"):
                    validate(_with(sched, r, bad))
                swapped += 1
            # a send swapped with the compute that produces its tensor
            if a.op in (Op.SEND_F, Op.SEND_B) and i > 0 and acts[i - 1].op.is_compute:
                bad = list(acts)
                bad[i - 1], bad[i] = bad[i], bad[i - 1]
                with pytest.raises(ScheduleError, match="before its"):
                    validate(_with(sched, r, bad))
                swapped += 1
        # two receives on the same channel with different labels: FIFO order broken
        recvs = [i for i, a in enumerate(acts) if a.op in (Op.RECV_F, Op.RECV_B)]
        for i, j in zip(recvs, recvs[1:]):
            if acts[i].peer == acts[j].peer:
                bad = list(acts)
                bad[i], bad[j] = bad[j], bad[i]
                with pytest.raises(ScheduleError):
                    validate(_with(sched, r, bad))
                swapped += 1
                break
    assert swapped > 0


def test_validator_detects_deadlock() -> None:
    """Moving rank 0's first receive of a gradient after its consumer's send order creates a wait cycle."""
    sched = build_schedule("1f1b", pp=2, num_microbatches=2)
    # rank 1 posts its first gradient send only after receiving F1 which rank 0 sends after the gradient
    acts0 = [a for a in sched.actions[0]]
    acts1 = [a for a in sched.actions[1]]
    # both ranks wait to receive before sending anything: rank 0 receives B0 before sending F0
    recv_b0 = next(a for a in acts0 if a.op is Op.RECV_B and a.mb == 0)
    acts0.remove(recv_b0)
    acts0.insert(0, recv_b0)
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(_with(_with(sched, 1, acts1), 0, acts0))


def test_text_timeline_shows_every_action() -> None:
    sched = build_schedule("dualpipev", pp=2, num_microbatches=4)
    text = text_timeline(sched)
    assert text.count("\n") == 2
    assert text.count("[") == sum(1 for acts in sched.actions for a in acts if a.op.is_compute)
