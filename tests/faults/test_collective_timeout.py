"""Hangs (issue 16, item 2): one timeout for every process group, and a stuck rank ends the job.

A 2-rank torchrun job (plain data parallel, tiny model) runs with parallel.collective_timeout_s=8;
once it trains, rank 1 is stopped with SIGSTOP (alive but stuck, the case a dead peer's closed
connection does not cover). Rank 0 must fail its next collective after about 8 s with a message
naming itself, the step and the setting, and torchrun must end the job (exit code != 0) well
before torch's 30-minute default. Measured before this: a SIGSTOPped rank was noticed after 600 s.

Slow (about 45 s, 30 of them torchrun's fixed grace period before it SIGKILLs the stopped rank):
the default suite has the same scenario under srun (tests/faults/test_srun_failures.py, about
18 s), where the same collective timeout ends the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megads.testing.launch import REPO, trainer_command, trainer_env, worker_pids

ARGS = ["model=tiny", "seq_len=32", "parallel=dp", "parallel.micro_batch_size=2", "schedule=tiny",
        "schedule.train_tokens=0", "schedule.train_steps=400", "schedule.batch_start=4", "schedule.batch_end=4",
        "data=fallback", "data.max_bytes=200000", "logging.console_every=1", "checkpoint.at_end=false",
        "parallel.collective_timeout_s=8"]


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_timeout(tmp_path: Path) -> None:
    run = tmp_path / "run"
    log = tmp_path / "out.txt"
    with log.open("w") as out:
        proc = subprocess.Popen(trainer_command([*ARGS, f"run_dir={run}"], nproc=2), cwd=REPO,
                                env=trainer_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)
        workers = worker_pids(proc.pid)
        assert sorted(workers) == [0, 1], workers
        os.kill(workers[1], signal.SIGSTOP)
        t_stop = time.monotonic()
        code = proc.wait(timeout=120)
        waited = time.monotonic() - t_stop
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in worker_pids(proc.pid).values():
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert code != 0
    assert "rank 0, step" in text and "did not complete within parallel.collective_timeout_s=8 s" in text, text[-3000:]
    print(f"job ended {waited:.1f} s after the SIGSTOP")
    assert waited < 90
