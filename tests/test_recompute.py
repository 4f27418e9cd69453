"""Activation recomputation (issue 13, item 3): none / selective / full give the same losses and
gradients, under 1F1B and under DualPipeV with expert parallel (the F&B-overlapped stage, whose
B/W-split W pass recomputes a second time), and keep less for the backward.

References: the `none` run of the same executor (which other tests hold to a single process) and,
for the saved bytes, autograd's own saved-tensor hooks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megads.model.recompute import apply_recompute
from megads.model.transformer import DeepseekV3
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh
from megads.testing.parallel import (
    LayoutSpec,
    assert_same_steps,
    losses_and_reduced_grads,
    make_batches,
    plan_spec,
    spawn,
    tiny_config,
)

MODES = ("none", "selective", "full")


def _saved_bytes(model: DeepseekV3, ids: torch.Tensor) -> int:
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.compute_loss(ids, torch.roll(ids, -1, dims=1), mtp_weight=0.3)
    out.total.backward()
    return saved[0]


def test_recompute_keeps_less_and_changes_nothing() -> None:
    cfg = tiny_config()
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    results = {}
    for mode in MODES:
        torch.manual_seed(3)
        model = DeepseekV3(cfg)
        pieces = apply_recompute(model, mode)
        assert (pieces == 0) == (mode == "none")
        nbytes = _saved_bytes(model, ids)
        results[mode] = (nbytes, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                         {n for n, _ in model.named_parameters()})
    none, sel, full = (results[m] for m in MODES)
    assert none[2] == sel[2] == full[2]  # parameter names unchanged
    for other in (sel, full):
        assert other[1].keys() == none[1].keys()
        for n in none[1]:
            assert torch.equal(other[1][n], none[1][n]), n  # the same ops on the same inputs
    print("saved bytes none / selective / full:", none[0], sel[0], full[0])
    assert full[0] < sel[0] < 0.7 * none[0]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="memory.recompute='some'"):
        apply_recompute(DeepseekV3(tiny_config()), "some")


def _worker(rank: int, world: int, outdir: str, schedule: str) -> None:
    cfg = tiny_config()
    batches = make_batches(cfg, steps=1, global_batch=8, seq_len=16)
    spec = LayoutSpec(pp=2, ep=2, schedule=schedule)
    plan = plan_spec(cfg, spec, world=world)
    mesh = ParallelMesh.build(plan)
    out = {}
    for mode in MODES:
        ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, schedule=schedule, micro_batch_size=1, seed=5,
                              optim=OptimSettings(lr=1e-2), recompute=mode, overlap_fb=schedule == "dualpipev")
        out[mode] = losses_and_reduced_grads(ex, batches)
    torch.save(out, Path(outdir) / f"rank{rank}.pt")


@pytest.mark.parametrize("schedule", ["1f1b", "dualpipev"])
def test_recompute_modes_agree_under_the_pipeline_with_ep(schedule: str, tmp_path: Path) -> None:
    spawn(4, _worker, str(tmp_path), schedule)
    for rank in range(4):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        for mode in ("selective", "full"):
            assert_same_steps(out["none"], out[mode])
