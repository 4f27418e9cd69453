"""megads under a real Slurm (tools/local_slurm.sh): sbatch, preemption with requeue, Hydra sweeps.

A single-node Slurm 22.05 runs on the test machine: `.ci/run` starts it (and sets
MEGADS_REQUIRE_SLURM=1, so that a Slurm that does not come up fails the suite instead of
skipping it); elsewhere the fixture starts it when it can (root with apt-get) and skips otherwise.
The jobs train the tiny model with 2 tasks on gloo, submitted as a user would.

- `sbatch launch/slurm.sbatch` trains and exits 0 (the reference run of the next checks);
- SIGUSR1 to the batch script (what `--signal=B:USR1@120` does before the time limit), ranks under
  srun: every rank stops after the same step with a checkpoint, the script requeues the job, the
  requeued job resumes from it: the per-step losses equal the uninterrupted job's bit for bit;
- `scontrol requeue` (SIGTERM to every process of the job, Slurm requeues it), ranks under
  torchrun inside srun: the same;
- `megads-train -m hydra/launcher=slurm` with two learning rates: two jobs of 2 tasks each, two
  run folders, two wandb runs in one group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megads.testing.wandb_log import read_records, run_record

REPO = Path(__file__).resolve().parents[1]
ARGS = ["model=tiny", "parallel=ep", "seq_len=64", "schedule=tiny", "schedule.train_tokens=0",
        "schedule.train_steps=20", "schedule.warmup_steps=2", "schedule.batch_start=4", "schedule.batch_end=4",
        "data=fallback", "data.max_bytes=200000", "checkpoint.every_steps=100", "logging.loss_png=false",
        "logging.expert_load_png=false", "logging.expert_heatmap_png=false", "logging.console_every=1", "logging.wandb.mode=offline"]
CPU_NODE = ["--nodes", "1", "--ntasks-per-node", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]


def _env(tmp: Path, name: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "MEGADS_SNAPSHOT": str(tmp / f"code-{name}"),
            "WANDB_MODE": "offline", **extra}


def _sbatch(tmp: Path, name: str, *overrides: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--job-name", f"megads-test-{name}", *CPU_NODE, "-o", str(tmp / f"{name}.out"),
         str(REPO / "launch" / "slurm.sbatch"), *ARGS, f"run_dir={tmp / name}", *overrides],
        cwd=REPO, env=env or _env(tmp, name), capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


def _state(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def _metrics(run: Path) -> list[tuple[int, float, float]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(int(r["step"]), r["loss/lm"], r["grad_norm"]) for r in rows]


def _wait(cond, what: str, timeout_s: float = 420) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def _log(tmp: Path, name: str) -> str:
    path = tmp / f"{name}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def test_sbatch_trains_and_preempted_jobs_requeue_without_losing_a_step(slurm: None, tmp_path: Path) -> None:
    t0 = time.monotonic()
    jobs = {
        "ref": _sbatch(tmp_path, "ref"),
        "usr1": _sbatch(tmp_path, "usr1"),
        "requeue": _sbatch(tmp_path, "requeue", env=_env(tmp_path, "requeue", MEGADS_LAUNCHER="torchrun")),
    }
    # mid-run (after step 4 of 20): SIGUSR1 to the batch script only (the --signal=B:USR1@N path), and
    # scontrol requeue (SIGTERM to every process of the job, then Slurm requeues it)
    actions = {"usr1": ["scancel", "--batch", "--signal=USR1", jobs["usr1"]],
               "requeue": ["scontrol", "requeue", jobs["requeue"]]}

    def signal_when_due() -> bool:
        for name in [n for n in actions if len(_metrics(tmp_path / n)) >= 4]:
            subprocess.run(actions.pop(name), check=True, timeout=30)
        return not actions

    _wait(signal_when_due, "step 4 of the jobs to signal")
    for name, job in jobs.items():
        _wait(lambda job=job: _state(job) == "", f"job {name} ({job}) to finish: {_log(tmp_path, name)[-2000:]}")
    wall = time.monotonic() - t0

    ref_log = _log(tmp_path, "ref")
    assert "done: 20 steps" in ref_log and "restart 1" not in ref_log, ref_log[-3000:]
    ref = _metrics(tmp_path / "ref")
    assert [s for s, *_ in ref] == list(range(1, 21))
    for name in ("usr1", "requeue"):
        log = _log(tmp_path, name)
        assert "(restart 1)" in log, log[-3000:]  # the job ran again after the requeue
        stops = [line for line in log.splitlines() if "stopped after step" in line]
        assert len(stops) == 1, log[-3000:]
        stopped = int(stops[0].split("stopped after step ")[1].split("/")[0])
        assert 4 <= stopped < 20
        assert f"resumed from {tmp_path / name / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
        assert _metrics(tmp_path / name) == ref, name  # 0 steps lost, every step bit-identical
    print(f"3 jobs (2 preempted and requeued) in {wall:.0f} s")


def _sweep_job_of(sweep: Path, folder: str) -> str | None:
    """The Slurm job id of the sweep point whose run folder is `folder` (from its submitit log): an
    array task's id, `<array job>_<index>`, which is also the name of its submitit folder."""
    for log in (sweep / ".submitit").glob("*/*_0_log.out"):
        if f"' in {sweep / folder}\n" in log.read_text(errors="replace"):  # the run's first line
            return log.parent.name
    return None


def test_a_hydra_sweep_submits_one_slurm_job_per_point(slurm: None, tmp_path: Path) -> None:
    """Two points, two jobs of 2 tasks; the first gets submitit's requeue signal (SIGUSR2) mid-run:
    megads finishes the step with a checkpoint, hands the signal back to submitit, which requeues
    the job; the requeued job resumes in the same run folder from that checkpoint (0 steps lost)."""
    sweep = tmp_path / "sweep"
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "megads.train.cli", "-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2",
         "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=20",
         f"hydra.sweep.dir={sweep}", *ARGS, "schedule.train_steps=12", "optim.lr=1e-3,2e-3"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    preempted = sweep / "0_optim.lr=0.001"
    signalled: list[str] = []

    def signal_when_due() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before its first job was signalled: {proc.stdout.read()[-3000:]}")
        job = _sweep_job_of(sweep, preempted.name) if len(_metrics(preempted)) >= 3 else None
        if job:
            subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)
            signalled.append(job)
        return bool(signalled)

    try:
        _wait(signal_when_due, "step 3 of the first sweep job")
        out, _ = proc.communicate(timeout=420)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-5000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
    assert [p.name for p in runs] == ["0_optim.lr=0.001", "1_optim.lr=0.002"], list(sweep.iterdir())
    groups, ids = set(), set()
    for run in runs:
        assert [s for s, *_ in _metrics(run)] == list(range(1, 13)), run  # every step once: none lost, none twice
        logs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
        recs = {run_record(read_records(log)).run_id: run_record(read_records(log)) for log in logs}
        groups.update(r.run_group for r in recs.values())
        ids.update(recs)
    assert len(ids) == 2 and len(groups) == 1 and groups != {""}, (ids, groups)  # the requeued job kept its id
    job_logs = sorted((sweep / ".submitit").rglob("*_0_log.out"))
    assert len(job_logs) == 2, job_logs
    for p in job_logs:  # the console lines reach the job logs, and both tasks trained as one job
        text = p.read_text()
        assert "[megads" in text and "ranks 2 (pp 1, dp 2" in text, text[-2000:]
    (job,) = signalled
    text = (sweep / ".submitit" / job / f"{job}_0_log.out").read_text()
    stops = [line for line in text.splitlines() if "stopped after step" in line]
    assert len(stops) == 1, text[-3000:]
    stopped = int(stops[0].split("stopped after step ")[1].split("/")[0])
    assert 3 <= stopped < 12, stops
    assert "this job is preempted" in text and "Requeued" in text, text[-3000:]  # submitit's handler requeued it
    assert f"resumed from {preempted / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in text, text[-3000:]
    print(f"sweep of 2 jobs (1 preempted through submitit and requeued) in {time.monotonic() - t0:.0f} s")
