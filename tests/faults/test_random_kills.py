"""Kills (issue 16, item 3): SIGKILL at random moments, relaunch, the same losses bit for bit.

One-process runs of the tiny model through the CLI checkpoint every 2 steps, synchronously and
with `checkpoint.async_save=true`. Each trial starts the run and kills it (SIGKILL, the whole
process group) a random 0-0.3 s after a random step (1-13) was logged -- inside the next step, a
synchronous save, or while the background writer is still writing -- then launches it again. Every trial's metrics.jsonl
must equal the uninterrupted reference's exactly (per-step losses and gradient norms), and no
trial may resume from a half-written folder. 10 kill points (5 per save mode), seeds fixed.

Slow (about 3 minutes): the default suite covers the property at fixed kill points
(tests/test_train_stages.py kills inside a stage, tests/test_train_run.py resumes a killed run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model=tiny", "parallel=single", "seq_len=128", "schedule=tiny", "schedule.train_tokens=0",
        "schedule.train_steps=14", "schedule.warmup_steps=2", "schedule.batch_start=4", "schedule.batch_end=4",
        "data=fallback", "data.max_bytes=200000", "logging.wandb.mode=disabled", "checkpoint.every_steps=2",
        "checkpoint.keep_last=2", "logging.loss_png=false", "logging.expert_load_png=false", "logging.expert_heatmap_png=false"]


def _cmd(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megads.train.cli", *ARGS, *extra, f"run_dir={run}"]


def _metrics(run: Path) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/lm"], r["grad_norm"]) for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_random_kills_resume_to_the_same_losses(async_save: bool, tmp_path: Path) -> None:
    extra = [f"checkpoint.async_save={str(async_save).lower()}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(ref, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rng = random.Random(1234 + async_save)
    killed_at = []
    for trial in range(5):
        run = tmp_path / f"trial{trial}"
        target, extra_s = rng.randint(1, 13), rng.uniform(0.0, 0.3)  # after step `target`, a bit into the next
        proc = subprocess.Popen(_cmd(run, *extra), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        log = run / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if log.is_file() and len(log.read_text().splitlines()) >= target:
                time.sleep(extra_s)
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        killed_at.append(len(log.read_text().splitlines()) if log.is_file() else 0)
        again = subprocess.run(_cmd(run, *extra), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert _metrics(run) == _metrics(ref), (trial, target, extra_s)
    print(f"async_save={async_save}: killed after steps {killed_at} (of 14)")
    assert len(set(killed_at)) >= 3 and max(killed_at) < 14  # different points, all before the end


@pytest.mark.slow
def test_killing_one_rank_ends_the_job_and_the_relaunch_resumes(tmp_path: Path) -> None:
    """kill -9 of rank 1 of a 2-rank torchrun job at 3 random steps: rank 0 fails its next
    collective at once (its peer's connections closed), torchrun ends the job, and the relaunch
    gives the uninterrupted run's losses bit for bit."""
    from megads.testing.launch import trainer_command, trainer_env, worker_pids

    args = [a for a in ARGS if not a.startswith("parallel=")] + ["parallel=dp", "parallel.micro_batch_size=2"]
    env = trainer_env()
    ref = tmp_path / "ref"
    done = subprocess.run(trainer_command([*args, f"run_dir={ref}"], nproc=2), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rng = random.Random(7)
    for trial in range(3):
        run = tmp_path / f"trial{trial}"
        target = rng.randint(1, 12)
        proc = subprocess.Popen(trainer_command([*args, f"run_dir={run}"], nproc=2), cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        log = run / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if log.is_file() and len(log.read_text().splitlines()) >= target:
                break
            time.sleep(0.01)
        workers = worker_pids(proc.pid)
        if 1 in workers:
            os.kill(workers[1], signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert code != 0 and time.monotonic() - t_kill < 90
        again = subprocess.run(trainer_command([*args, f"run_dir={run}"], nproc=2), cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        assert _metrics(run) == _metrics(ref), (trial, target)
