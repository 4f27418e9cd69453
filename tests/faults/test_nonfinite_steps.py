"""Non-finite steps (issue 16, item 1): skipped on every rank alike, the expert bias too; the Nth
in a row stops the run with a checkpoint of the last good state; loss spikes are logged.

References: a run that never saw the bad batch (the skipped step must leave no trace: identical
parameters, router biases and optimizer step count afterwards), and the run's own checkpoint
from before the bad steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megads.checkpoint.dcp import completed_steps, read_tensors
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh
from megads.parallel.zero1 import Zero1AdamW
from megads.testing.parallel import LayoutSpec, make_batches, plan_spec, spawn, tiny_config


def _worker(rank: int, world: int, outdir: str, poison: str) -> None:
    cfg = tiny_config()
    b0, b1, b2 = make_batches(cfg, steps=3, global_batch=4, seq_len=16)
    spec = LayoutSpec(pp=1, ep=2)
    plan = plan_spec(cfg, spec, world=world)
    mesh = ParallelMesh.build(plan)
    out = {}
    for run, batches in (("with_bad", [b0, b1, b2]), ("reference", [b0, b2])):
        ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, seed=2, micro_batch_size=1,
                              optim=OptimSettings(lr=1e-2, bias_update_speed=0.01))
        skipped = []
        for i, (ids, labels) in enumerate(batches):
            bad = run == "with_bad" and i == 1 and rank == 1  # one rank only
            handle, saved = None, None
            w = ex.model.layers["0"].self_attn.o_proj.weight
            if bad and poison == "parameter":  # NaN loss and gradients
                saved = w.detach().clone()
                with torch.no_grad():
                    w[0, 0] = float("nan")
            elif bad and poison == "gradient":  # finite loss, NaN gradient
                handle = w.register_hook(lambda g: torch.full_like(g, float("nan")))
            m = ex.step(ids, labels, mtp_weight=0.3)
            if saved is not None:
                with torch.no_grad():
                    w.copy_(saved)
            if handle is not None:
                handle.remove()
            skipped.append((m.skipped, math.isfinite(m.loss), math.isfinite(m.grad_norm)))
        biases = {n: b.clone() for n, b in ex.model.named_buffers() if "e_score_correction_bias" in n}
        out[run] = ({n: p.detach().clone() for n, p in ex.model.named_parameters()}, biases,
                    ex.optimizer.step_count, skipped)
    torch.save(out, Path(outdir) / f"rank{rank}.pt")


@pytest.mark.parametrize("poison", ["parameter", "gradient"])
def test_a_bad_step_on_one_rank_is_skipped_everywhere_without_a_trace(poison: str, tmp_path: Path) -> None:
    spawn(2, _worker, str(tmp_path), poison)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        params, biases, steps, skipped = out["with_bad"]
        ref_params, ref_biases, ref_steps, ref_skipped = out["reference"]
        assert [s[0] for s in skipped] == [False, True, False], (rank, skipped)  # both ranks skip step 2
        assert skipped[1][2] is False and skipped[1][1] is (poison == "gradient")
        assert not any(s[0] for s in ref_skipped)
        assert steps == ref_steps == 2
        for n in params:
            assert torch.equal(params[n], ref_params[n]), (rank, n)
        assert biases and all(torch.equal(biases[n], ref_biases[n]) for n in biases)


def test_consecutive_non_finite_steps_stop_the_run_with_the_last_good_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from megads.train.cli import compose_config as compose
    from megads.train.trainer import NonFiniteTraining, train

    real_norm = Zero1AdamW.global_grad_norm
    calls = {"n": 0}

    def norm_nan_from_step_3(self: Zero1AdamW) -> float:
        calls["n"] += 1
        return float("nan") if calls["n"] >= 3 else real_norm(self)

    monkeypatch.setattr(Zero1AdamW, "global_grad_norm", norm_nan_from_step_3)
    run = tmp_path / "run"
    cfg = compose(["model=tiny", "parallel=single", "seq_len=32", "schedule=tiny", "schedule.train_tokens=0",
                   "schedule.train_steps=8", "schedule.batch_start=4", "schedule.batch_end=4", "data=fallback",
                   "data.max_bytes=200000", "logging.wandb.mode=disabled", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
                   "guards.max_consecutive_skips=3", f"run_dir={run}"])
    with caplog.at_level("WARNING", logger="megads"), pytest.raises(NonFiniteTraining, match="steps 3-5") as e:
        train(cfg)
    assert "step 3: non-finite gradient norm" in caplog.text and "(3 in a row, 3 in all)" in caplog.text
    steps = [p.name for p in completed_steps(run / "checkpoints")]
    assert steps[-1] == "step_00000005" and str(run / "checkpoints" / "step_00000005") in str(e.value)
    for prefix in ("model.", "optim."):  # the last good parameters, master weights and moments
        good = read_tensors(run / "checkpoints" / "step_00000002", prefix=prefix)
        last = read_tensors(run / "checkpoints" / "step_00000005", prefix=prefix)
        assert len(good) > 20 and good.keys() == last.keys()
        assert all(torch.equal(good[k], last[k]) for k in good), prefix


def test_loss_spikes_are_found() -> None:
    from megads.train.trainer import SkipGuard

    g = SkipGuard(spike_factor=3.0, window=20)
    assert [g.record_loss(x) for x in [2.0] * 12] == [None] * 12
    assert g.record_loss(7.0) == 2.0  # 7 > 3 x median 2
    assert g.record_loss(5.0) is None
