"""Every schedule on real gloo ranks against a single-process run of the same sequential model.

One spawned group of 4 ranks runs all cases: pp=4 on all ranks, and pp=2 as two independent
pipelines ({0,1} and {2,3}) at the same time. Each rank compares what it owns (its micro-batch
losses, the gradients of its pieces, the parameters after one SGD step) with a reference computed
in-process, and writes the worst relative errors to a JSON file that the test reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from megads.pipeline.module_stage import ModuleStage
from megads.pipeline.render import save_step_png
from megads.pipeline.runtime import PipelineRuntime
from megads.pipeline.schedules import SCHEDULES, build_schedule, min_microbatches
from megads.pipeline.stage import TensorMeta
from megads.pipeline.timed import OverlappingModuleStage
from torch import nn

from megads.testing.launch import free_port
from megads.testing.parallel import start_ranks

D = 8  # hidden width
MB_SIZE = 3  # rows per micro-batch
LR = 0.1
TOL = 1e-6


def _cases() -> list[tuple[str, int, int]]:
    cases = [("dualpipev+overlap", 4, 8), ("dualpipe+overlap", 2, 4)]
    for pp in (2, 4):
        for name in SCHEDULES:
            lo = min_microbatches(name, pp=pp)
            counts = (
                {lo, 2 * lo} if name in ("interleaved", "dualpipe", "dualpipev") else {lo, pp, 2 * pp + 1}
            )
            if name == "dualpipev":
                counts.add(lo + 1)
            if name == "dualpipe":
                counts.add(lo + 2)
            cases += [(name, pp, m) for m in sorted(counts)]
    return cases


def _pieces(num_pieces: int) -> list[nn.Module]:
    out = []
    for p in range(num_pieces):
        torch.manual_seed(1000 + p)
        out.append(nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)))
    return out


def _microbatches(m_total: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (torch.randn(MB_SIZE, D, generator=g), torch.randn(MB_SIZE, D, generator=g)) for _ in range(m_total)
    ]


def _loss(out: torch.Tensor, mb: Any) -> torch.Tensor:
    return ((out - mb[1]) ** 2).mean()


def _reference(
    num_pieces: int, mbs: list
) -> tuple[list[float], list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    pieces = _pieces(num_pieces)
    losses = []
    for mb in mbs:
        h = mb[0]
        for piece in pieces:
            h = piece(h)
        loss = _loss(h, mb)
        (loss / len(mbs)).backward()
        losses.append(loss.item())
    grads = [[p.grad.clone() for p in piece.parameters()] for piece in pieces]
    with torch.no_grad():
        for piece in pieces:
            for p in piece.parameters():
                p -= LR * p.grad
    params = [[p.detach().clone() for p in piece.parameters()] for piece in pieces]
    return losses, grads, params


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    groups = {4: dist.new_group([0, 1, 2, 3]), 2: None}
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups[2] = pairs[rank // 2]
    results: list[dict[str, Any]] = []
    for name, pp, m_total in _cases():
        prank = rank % pp
        sched = build_schedule(name.split("+")[0], pp=pp, num_microbatches=m_total)
        layout = sched.layout
        ref_losses, ref_grads, ref_params = _reference(layout.num_pieces, _microbatches(m_total))
        all_pieces = _pieces(layout.num_pieces)
        mine = {layout.chunks[c].piece: all_pieces[layout.chunks[c].piece] for c in layout.chunks_on(prank)}
        stage_cls = OverlappingModuleStage if name.endswith("+overlap") else ModuleStage
        stage = stage_cls(
            mine,
            layout=layout,
            rank=prank,
            loss_fn=_loss,
            activation_meta=TensorMeta((MB_SIZE, D)),
            group=groups[pp],
        )
        draw = (name, pp, m_total) == ("dualpipev", 4, 8)
        runtime = PipelineRuntime(sched, stage=stage, rank=prank, group=groups[pp], record_timeline=draw)
        res = runtime.step(_microbatches(m_total))
        if draw:
            assert len(res.timeline) == sum(1 for a in sched.actions[prank] if a.op.is_compute)
            save_step_png(res, path=Path(out_dir) / "dualpipev_step.png", title="measured", group=groups[pp])
        err_loss = max(
            (abs(res.losses[m].item() - ref_losses[m]) / abs(ref_losses[m]) for m in res.losses), default=0.0
        )
        err_grad = max(
            _rel(p.grad, g) for piece, mod in mine.items() for p, g in zip(mod.parameters(), ref_grads[piece])
        )
        with torch.no_grad():
            for mod in mine.values():
                for p in mod.parameters():
                    p -= LR * p.grad
        err_param = max(
            _rel(p, q) for piece, mod in mine.items() for p, q in zip(mod.parameters(), ref_params[piece])
        )
        results.append(
            {
                "case": [name, pp, m_total],
                "rank": rank,
                "losses": sorted(res.losses),
                "err_loss": err_loss,
                "err_grad": err_grad,
                "err_param": err_param,
                "peak_live": res.peak_live,
                "stage_peak_live": stage.peak_live,
            }
        )
    dist.barrier()
    dist.destroy_process_group()
    tmp = Path(out_dir) / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(results))
    os.replace(tmp, Path(out_dir) / f"rank{rank}.json")



@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("pipeline_runtime")
    start_ranks(_worker, (4, free_port(), str(out)), 4)
    assert (out / "dualpipev_step.png").stat().st_size > 1000  # the measured timeline of one step
    rows: list[dict[str, Any]] = []
    for r in range(4):
        rows += json.loads((out / f"rank{r}.json").read_text())
    return rows


@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}-pp{c[1]}-mb{c[2]}")
def test_schedule_matches_single_process(results: list[dict[str, Any]], case: tuple[str, int, int]) -> None:
    rows = [r for r in results if tuple(r["case"]) == case]
    assert len(rows) == 4
    name, pp, m_total = case
    for row in rows:
        assert row["err_loss"] <= TOL, row
        assert row["err_grad"] <= TOL, row
        assert row["err_param"] <= TOL, row
        if name.endswith("+overlap"):  # the backward half of F&B may free before the forward half saves
            assert row["stage_peak_live"] <= row["peak_live"], row
        else:
            assert row["peak_live"] == row["stage_peak_live"], row
    # every micro-batch loss is seen exactly once per pipeline (two pp=2 pipelines run side by side)
    seen = sorted(m for row in rows for m in row["losses"])
    assert seen == sorted(list(range(m_total)) * (4 // pp)), seen
