"""A save that cannot be written (issue 16, item 6): the run says why, keeps the previous
checkpoint, leaves no partial folder, and goes on when only a periodic save failed.

The "full disk" is a per-process file-size limit (RLIMIT_FSIZE, 2 MB; SIGXFSZ ignored), so that
any write of a checkpoint data file fails with EFBIG without root or a tmpfs. A run checkpoints
steps 2 and 4; relaunched under the limit to step 8 it resumes from step 4, its step-6 save fails
(logged, training goes on), its final step-8 save fails (the run ends with the error), step 4
stays intact and verifies, no `.tmp` folder is left. Relaunched without the limit it resumes
from step 4 and ends with the uninterrupted run's losses bit for bit: 0 steps lost beyond the
documented bound (the steps since the last complete checkpoint).
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
from pathlib import Path

from megads.checkpoint.dcp import completed_steps, verify_folder

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model=tiny", "parallel=single", "seq_len=32", "schedule=tiny", "schedule.train_tokens=0",
        "schedule.warmup_steps=2", "schedule.batch_start=4", "schedule.batch_end=4", "data=fallback",
        "data.max_bytes=200000", "logging.wandb.mode=disabled", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
        "logging.loss_png=false", "logging.expert_load_png=false", "logging.expert_heatmap_png=false"]


def _limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write() instead of a killing signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))


def _run(run: Path, steps: int, *, limited: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "megads.train.cli", *ARGS, f"schedule.train_steps={steps}",
                           f"run_dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size if limited else None)


def _losses(run: Path) -> list[tuple[float, float]]:
    return [(r["loss/lm"], r["grad_norm"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def test_failed_saves_keep_the_previous_checkpoint_and_lose_nothing(tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert _run(ref, 8).returncode == 0
    run = tmp_path / "run"
    assert _run(run, 4).returncode == 0
    ckpts = run / "checkpoints"
    assert [p.name for p in completed_steps(ckpts)] == ["step_00000002", "step_00000004"]

    full = _run(run, 8, limited=True)
    out = full.stdout + full.stderr
    assert full.returncode != 0
    assert "checkpoint step_00000006 could not be written" in out and "training goes on" in out, out[-3000:]
    assert "checkpoint step_00000008 could not be written" in out, out[-3000:]
    assert "a write came short: the file system is full or a file-size limit was hit" in out and "MiB free there" in out
    assert "step_00000004 stays the latest" in out
    assert [p.name for p in completed_steps(ckpts)] == ["step_00000002", "step_00000004"]
    assert not [p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")]  # no partial folder left
    verify_folder(ckpts / "step_00000004")
    assert len(_losses(run)) == 8  # training went on past the failed step-6 save

    again = _run(run, 8)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "resumed from" in again.stdout and "step_00000004" in again.stdout
    assert _losses(run) == _losses(ref)
