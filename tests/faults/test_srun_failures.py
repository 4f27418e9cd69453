"""Hangs and deaths under srun (issue 16, item 2, the Slurm half; tests/faults/test_collective_timeout.py
and test_random_kills.py are the torchrun half): two 2-task jobs of launch/slurm.sbatch on the local
Slurm with parallel.collective_timeout_s=8. In one, rank 1 is stopped (SIGSTOP) once it trains: rank 0
fails its next collective after the timeout, naming itself, the step and the setting, and srun ends the
job. In the other, rank 1 is killed (SIGKILL): `srun --kill-on-bad-exit=1` ends the job at once. Neither
job hangs or requeues (a failure is not a preemption); both end with a non-zero exit code.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARGS = ["model=tiny", "seq_len=32", "parallel=dp", "parallel.micro_batch_size=2", "schedule=tiny",
        "schedule.train_tokens=0", "schedule.train_steps=400", "schedule.batch_start=4", "schedule.batch_end=4",
        "data=fallback", "data.max_bytes=200000", "logging.console_every=1", "checkpoint.at_end=false",
        "logging.wandb.mode=disabled", "parallel.collective_timeout_s=8"]
CPU_NODE = ["--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of the task with SLURM_PROCID=`rank` of `job` running megads_train.py."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if b"megads_train.py" not in (d / "cmdline").read_bytes():
                continue
            env = dict(kv.split(b"=", 1) for kv in (d / "environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if env.get(b"SLURM_JOB_ID") == job.encode() and env.get(b"SLURM_PROCID") == str(rank).encode():
            return int(d.name)
    return None


def _job_state(job: str) -> tuple[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", ""), fields.get("ExitCode", "")


def test_a_stuck_or_dead_rank_ends_the_srun_job(slurm: None, tmp_path: Path) -> None:
    jobs, runs = {}, {}
    for name in ("stop", "kill"):
        runs[name] = tmp_path / name
        env = {**os.environ, "PYTHON": sys.executable, "MEGADS_SNAPSHOT": str(tmp_path / f"code-{name}")}
        jobs[name] = subprocess.run(
            ["sbatch", "--parsable", "--job-name", f"megads-fault-{name}", *CPU_NODE, "-o", str(tmp_path / f"{name}.out"),
             str(REPO / "launch" / "slurm.sbatch"), *ARGS, f"run_dir={runs[name]}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True).stdout.strip().split(";")[0]
    sent: dict[str, float] = {}
    ended: dict[str, float] = {}
    deadline = time.monotonic() + 400
    while len(ended) < 2:
        assert time.monotonic() < deadline, {n: _job_state(j) for n, j in jobs.items()}
        for name, job in jobs.items():
            metrics = runs[name] / "metrics.jsonl"
            if name not in sent and metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                pid = _rank_pid(job, 1)
                if pid is not None:
                    os.kill(pid, signal.SIGSTOP if name == "stop" else signal.SIGKILL)
                    sent[name] = time.monotonic()
            if name in sent and name not in ended and _job_state(job)[0] not in ("RUNNING", "COMPLETING", "PENDING"):
                ended[name] = time.monotonic()
        time.sleep(0.2)
    figures = {name: round(ended[name] - sent[name], 1) for name in jobs}
    print("job ended this many seconds after the signal:", json.dumps(figures))
    for name, job in jobs.items():
        state, code = _job_state(job)
        log = (tmp_path / f"{name}.out").read_text(errors="replace")
        assert state == "FAILED" and code != "0:0", (name, state, code, log[-3000:])
        assert "(restart 1)" not in log and "requeueing" not in log, log[-3000:]  # a failure is not a preemption
    stop_log = (tmp_path / "stop.out").read_text(errors="replace")
    assert "rank 0, step" in stop_log and "did not complete within parallel.collective_timeout_s=8 s" in stop_log, \
        stop_log[-3000:]
    assert figures["stop"] < 60, figures  # the 8 s timeout and srun's teardown, not torch's 30-minute default
    assert figures["kill"] < 30, figures
