"""End-to-end: `megads-train` under torchrun with 2 gloo ranks on a tiny model.

Reference for resume: an uninterrupted 8-step run that checkpoints at step 4. A new run
folder holding that step-4 checkpoint and a metric log running to step 8 (what a run killed
after step 8, before its next checkpoint, leaves behind) is launched; it must resume and reproduce the uninterrupted run's loss trajectory and final
weights (router biases included) exactly.
The uninterrupted run also checks the wandb offline run folder and the PNGs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megads.checkpoint.dcp import read_tensors
from megads.testing.launch import run_trainer

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=tiny", "seq_len=32", "parallel=dp",
    "parallel.micro_batch_size=2", "schedule=tiny", "schedule.train_tokens=0", "schedule.warmup_steps=2",
    "schedule.batch_start=4", "schedule.batch_end=8", "schedule.batch_ramp_tokens=600",
    "schedule.constant_tokens=800", "schedule.decay_tokens=1000", "schedule.mtp_weight_switch_tokens=900",
    "logging.console_every=1", "optim.lr=3e-3",
]


FALLBACK = ("data=fallback", "data.max_bytes=400000")


def _launch(
    run_dir: Path, *overrides: str, wandb_mode: str = "disabled", data: tuple[str, ...] = FALLBACK
) -> subprocess.CompletedProcess[str]:
    return run_trainer([*COMMON, *data, f"run_dir={run_dir}", *overrides], nproc=2, wandb_mode=wandb_mode,
                       timeout=300)


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    proc = _launch(run_dir, "schedule.train_steps=8", "checkpoint.every_steps=4", wandb_mode="offline")
    return run_dir, proc


def test_two_rank_run_trains_and_leaves_results(full_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    run_dir, proc = full_run
    m = _metrics(run_dir)
    assert [h["step"] for h in m] == list(range(1, 9))
    assert m[-1]["loss/lm"] < m[0]["loss/lm"] - 0.5  # loss falls
    assert [h["batch_sequences"] for h in m][:1] == [4] and m[-1]["batch_sequences"] == 8  # ramp
    assert m[-1]["tokens"] == sum(h["batch_sequences"] for h in m) * 32
    assert all(h["grad_norm"] > 0 and "load/imbalance_mean" in h for h in m)
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"step_00000004", "step_00000008"}
    assert (run_dir / "loss.png").stat().st_size > 1000 and (run_dir / "expert_load.png").is_file()
    assert (run_dir / "config.yaml").read_text().count("seq_len: 32") == 1
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), offline
    assert "results:" in proc.stdout and str(run_dir / "loss.png") in proc.stdout


def _killed_after_step_8(ref_dir: Path, run_dir: Path) -> None:
    """The state a run killed after step 8, before its next checkpoint, leaves behind."""
    shutil.copytree(ref_dir / "checkpoints/step_00000004", run_dir / "checkpoints/step_00000004")
    shutil.copy(ref_dir / "metrics.jsonl", run_dir / "metrics.jsonl")


def _check_resume(ref_dir: Path, run_dir: Path, data: tuple[str, ...], *overrides: str) -> None:
    _killed_after_step_8(ref_dir, run_dir)
    proc = _launch(run_dir, "schedule.train_steps=8", *overrides, data=data)
    assert "resumed from" in proc.stdout and "step_00000004" in proc.stdout
    ref, got = _metrics(ref_dir), _metrics(run_dir)
    assert [h["step"] for h in got] == list(range(1, 9))
    for a, b in zip(ref, got):
        for key in ("loss/lm", "loss/mtp", "loss/balance", "grad_norm", "lr", "tokens", "load/imbalance_mean"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    sd_ref = read_tensors(ref_dir / "checkpoints/step_00000008")
    sd_got = read_tensors(run_dir / "checkpoints/step_00000008")
    assert sd_ref.keys() == sd_got.keys()
    biases = [k for k in sd_ref if k.endswith("e_score_correction_bias")]
    assert biases and any(sd_ref[k].abs().sum() > 0 for k in biases)
    for k in sd_ref:
        torch.testing.assert_close(sd_got[k], sd_ref[k], rtol=1e-6, atol=1e-7, msg=k)


def test_resume_reproduces_uninterrupted_run(
    full_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    _check_resume(full_run[0], tmp_path / "run", FALLBACK)


def test_resume_with_another_bucket_size_reproduces_the_run(
    full_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """Issue 9, defect 8: the ZeRO-1 bucket layout is not part of the saved state (it is stored
    by parameter name), so a resume with another bucket size continues the same run."""
    _check_resume(full_run[0], tmp_path / "run", FALLBACK, "parallel.bucket_numel=1000")


def test_resume_applies_changed_optimizer_settings_when_allowed(
    full_run: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """Issue 9, defect 9: new optimizer settings on resume used to be ignored (bit-identical
    steps). Refused by default (tests/test_train_preflight.py); allowed, they act and are logged."""
    run_dir = tmp_path / "run"
    _killed_after_step_8(full_run[0], run_dir)
    proc = _launch(run_dir, "schedule.train_steps=8", "optim.weight_decay=5.0", "optim.betas=[0.5,0.6]",
                   "optim.eps=1e-2", "checkpoint.allow_changed_settings=true")
    assert "changed setting (checkpoint.allow_changed_settings=true), applies from step 5: optim.betas" in proc.stdout
    ref, got = _metrics(full_run[0]), _metrics(run_dir)
    assert [h["loss/lm"] for h in got[:4]] == [h["loss/lm"] for h in ref[:4]]
    assert all(abs(a["loss/lm"] - b["loss/lm"]) > 1e-4 for a, b in zip(ref[5:], got[5:]))


@pytest.mark.slow
def test_resume_with_builtin_data(tmp_path: Path) -> None:
    """The same with the data pipeline's loader (prefetching); prepares the built-in data if needed."""
    data = ("data=builtin",)
    ref_dir = tmp_path / "ref"
    _launch(ref_dir, "schedule.train_steps=8", "checkpoint.every_steps=4", data=data)
    _check_resume(ref_dir, tmp_path / "run", data)
