"""The schedule registry: adding a schedule is one `register_schedule` call.

A toy schedule (GPipe-like fill-drain: every forward, then every full backward) is registered
here and nowhere else; the tests show that the validator, the analytic bubble, the configs, the
batch-ramp granularity and the real runtime on 2 gloo ranks (against a single-process run of the
same model) all accept it without any other edit. `check_spec` proves each built-in entry
consistent with its generator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from megads.pipeline.actions import BW, Action, F, Op, Schedule, add_communication
from megads.pipeline.module_stage import ModuleStage
from megads.pipeline.runtime import PipelineRuntime
from megads.pipeline.schedules import (
    SCHEDULES,
    ScheduleSpec,
    analytic_bubble,
    build_schedule,
    get_schedule,
    linear_layout,
    register_schedule,
    schedule_names,
    unregister_schedule,
    validate_microbatches,
)
from megads.pipeline.stage import TensorMeta
from megads.pipeline.validate import Costs, ScheduleError, check_spec, simulate, validate

# the pieces and micro-batches of the runtime tests (same widths), so the toy runs the same model
from test_pipeline_runtime import MB_SIZE, D, _microbatches, _pieces  # noqa: E402

from megads.parallel.config import ParallelConfig, pieces_per_rank
from megads.testing.launch import free_port
from megads.testing.parallel import start_ranks
from megads.train.schedule import batch_granularity

TOL = 1e-6


def fill_drain(pp: int, *, num_microbatches: int) -> Schedule:
    """GPipe: every rank runs all its forwards, then all its full backwards (in micro-batch order)."""
    if pp < 1 or num_microbatches < 1:
        raise ValueError(f"schedule 'fill_drain': pp={pp}, num_microbatches={num_microbatches}; both must be >= 1")
    layout = linear_layout(pp, num_microbatches=num_microbatches)
    compute: list[list[Action]] = [
        [F(r, m) for m in range(num_microbatches)] + [BW(r, m) for m in range(num_microbatches)] for r in range(pp)
    ]
    actions = add_communication(layout, compute=compute)
    return Schedule("fill_drain", layout, num_microbatches, tuple(tuple(a) for a in actions))


TOY = ScheduleSpec(
    name="fill_drain",
    generator=fill_drain,
    min_microbatches=lambda pp: 1,
    bubble=lambda pp, F, B, W, FB: (pp - 1) * (F + B),
    description="GPipe fill-drain: all forwards, then all full backwards (a registry example)",
)


@pytest.fixture
def toy() -> Iterator[ScheduleSpec]:
    spec = register_schedule(TOY)
    try:
        yield spec
    finally:
        unregister_schedule(TOY.name)


@pytest.mark.parametrize("name", SCHEDULES)
def test_builtin_entries_match_their_generators(name: str) -> None:
    assert check_spec(name, pps=(1, 2, 3, 4, 6)) > 0


def test_toy_schedule_validates_and_meets_its_bubble(toy: ScheduleSpec) -> None:
    assert toy.name in schedule_names() and get_schedule(toy.name) is toy
    assert check_spec(toy.name) > 0  # generator and registry agree; every schedule deadlock-free
    for pp in (2, 3, 4):
        for m in (1, pp, 2 * pp + 1):
            sched = build_schedule(toy.name, pp=pp, num_microbatches=m)
            validate(sched)
            assert not any(a.op is Op.FB for acts in sched.actions for a in acts)
            sim = simulate(sched, costs=Costs(1, 1, 1), strict=False)
            assert max(sim.bubble) == analytic_bubble(toy.name, pp=pp, F=1, B=2, W=1, FB=3)
            assert max(sim.peak_live) == m  # every micro-batch live at once: GPipe's memory cost


def test_toy_schedule_is_accepted_by_the_configs(toy: ScheduleSpec) -> None:
    ParallelConfig(pp=2, schedule=toy.name).validate(world_size=4)
    assert ParallelConfig(pp=2, schedule=toy.name).pieces_per_rank() == 1 == pieces_per_rank(toy.name)
    gran = batch_granularity(schedule=toy.name, pp=2, micro_batch_size=3, dp=2)
    assert (gran.multiple, gran.minimum, gran.schedule) == (6, 6, toy.name)
    validate_microbatches(toy.name, pp=2, num_microbatches=5)


def test_registry_refuses_duplicates_and_unknown_names(toy: ScheduleSpec) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_schedule(TOY)
    with pytest.raises(ValueError, match="choose one of"):
        get_schedule("gpipe")
    with pytest.raises(ValueError, match="must be one of"):
        ParallelConfig(pp=2, schedule="gpipe").validate(world_size=2)


def test_check_spec_catches_a_wrong_entry() -> None:
    wrong = ScheduleSpec(
        name="fill_drain_wrong", generator=fill_drain, min_microbatches=lambda pp: 2,
        bubble=TOY.bubble, description="declares a minimum its generator does not have",
    )
    register_schedule(wrong)
    try:
        with pytest.raises(ScheduleError, match="the generator builds"):
            check_spec(wrong.name)
    finally:
        unregister_schedule(wrong.name)
    assert "fill_drain_wrong" not in schedule_names()


def test_unregistered_toy_is_gone() -> None:
    assert TOY.name not in schedule_names()
    with pytest.raises(ValueError, match="is unknown"):
        build_schedule(TOY.name, pp=2, num_microbatches=2)


# ----------------------------------------------------------------------------------------------
# the real runtime on 2 gloo ranks


def _loss(out: torch.Tensor, mb: Any) -> torch.Tensor:
    return ((out - mb[1]) ** 2).mean()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    register_schedule(TOY)  # a fresh process: the registry holds the built-ins only
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = []
    for m_total in (1, 3, 4):
        sched = build_schedule(TOY.name, pp=world, num_microbatches=m_total)
        layout = sched.layout
        # the single-process reference: the same pieces in sequence, mean micro-batch loss
        ref = _pieces(layout.num_pieces)
        ref_losses = []
        for mb in _microbatches(m_total):
            h = mb[0]
            for piece in ref:
                h = piece(h)
            loss = _loss(h, mb)
            (loss / m_total).backward()
            ref_losses.append(loss.item())
        all_pieces = _pieces(layout.num_pieces)
        mine = {layout.chunks[c].piece: all_pieces[layout.chunks[c].piece] for c in layout.chunks_on(rank)}
        meta = TensorMeta((MB_SIZE, D))
        stage = ModuleStage(mine, layout=layout, rank=rank, loss_fn=_loss, activation_meta=meta)
        res = PipelineRuntime(sched, stage=stage, rank=rank).step(_microbatches(m_total))
        err_loss = max((abs(res.losses[m].item() - ref_losses[m]) / abs(ref_losses[m]) for m in res.losses),
                       default=0.0)
        err_grad = max(
            _rel(p.grad, q.grad)
            for piece, mod in mine.items()
            for p, q in zip(mod.parameters(), ref[piece].parameters())
        )
        results.append({"m": m_total, "losses": sorted(res.losses), "err_loss": err_loss, "err_grad": err_grad,
                        "peak_live": res.peak_live})
    dist.barrier()
    dist.destroy_process_group()
    tmp = Path(out_dir) / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(results))
    os.replace(tmp, Path(out_dir) / f"rank{rank}.json")



def test_toy_schedule_runs_on_gloo_ranks_like_one_process(tmp_path: Path) -> None:
    start_ranks(_worker, (2, free_port(), str(tmp_path)), 2)
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rows in zip(*per_rank):
        m_total = rows[0]["m"]
        for row in rows:
            assert row["err_loss"] <= TOL and row["err_grad"] <= TOL, row
            assert row["peak_live"] == m_total, row
        assert sorted(m for row in rows for m in row["losses"]) == list(range(m_total))  # the last rank's
