"""Preemption without Slurm: a signal stops the run after the step with a checkpoint, 0 steps lost.

The Slurm paths (the batch script's forwarding, srun, torchrun under srun, the requeue) are in
tests/test_slurm.py; these run anywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megads.train.preemption import EXIT_PREEMPTED, MARKER_ENV, Preempted, PreemptionWatch, touch_marker

REPO = Path(__file__).resolve().parents[1]
ARGS = ["model=tiny", "parallel=single", "seq_len=64", "schedule=tiny", "schedule.train_tokens=0",
        "schedule.train_steps=12", "schedule.warmup_steps=2", "schedule.batch_start=4", "schedule.batch_end=4",
        "data=fallback", "data.max_bytes=200000", "logging.wandb.mode=disabled", "checkpoint.every_steps=100",
        "logging.loss_png=false", "logging.expert_load_png=false", "logging.expert_heatmap_png=false", "logging.console_every=1"]


def test_the_watch_records_the_first_signal_and_gives_the_handlers_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    with PreemptionWatch() as watch:
        assert watch.agreed(device=__import__("torch").device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeat (another kind): the first one stays the reason
        time.sleep(0.05)
        assert watch.received == signal.SIGUSR1
        assert watch.agreed(device=__import__("torch").device("cpu")) == signal.SIGUSR1
    assert {s: signal.getsignal(s) for s in before} == before


def test_the_marker_is_written_only_when_asked(tmp_path: Path) -> None:
    p = Preempted(step=7, signal_name="SIGUSR1", checkpoint=tmp_path / "step_00000007")
    assert touch_marker(p, environ={}) is None
    marker = touch_marker(p, environ={MARKER_ENV: str(tmp_path / "m" / "job.preempted")})
    assert marker is not None and "step 7" in marker.read_text() and "SIGUSR1" in marker.read_text()


def _metrics(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(int(r["step"]), r["loss/lm"], r["grad_norm"]) for r in rows]


def test_a_signal_mid_run_costs_no_step(tmp_path: Path) -> None:
    """One process of the CLI: SIGTERM after step 4 -> checkpoint of the step it was in, exit 75,
    the marker; the relaunch goes on from there and the losses equal an uninterrupted run's.
    (SIGUSR1 takes the same path: tests/test_slurm.py sends it through the batch script.)"""
    sig = signal.SIGTERM
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARKER_ENV: str(tmp_path / "job.preempted")}
    cmd = [sys.executable, "-m", "megads.train.cli", *ARGS]
    ref = subprocess.run([*cmd, f"run_dir={tmp_path / 'ref'}"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-2000:]
    # the three PNGs switched off in ARGS are not written (on by default: tests/test_wandb_views.py)
    for png in ("loss.png", "expert_load.png", "expert_load_heatmap.png"):
        assert not (tmp_path / "ref" / png).exists(), png
    run = tmp_path / "run"
    proc = subprocess.Popen([*cmd, f"run_dir={run}"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(_metrics(run)) >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, out[-3000:]
    stopped = _metrics(run)[-1][0]
    assert 4 <= stopped < 12, out[-3000:]
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == [f"step_{stopped:08d}"], ckpts  # the step it stopped after: nothing to redo
    assert f"{sig.name}: stopped after step {stopped}/12" in out
    assert f"step {stopped}" in (tmp_path / "job.preempted").read_text()
    again = subprocess.run([*cmd, f"run_dir={run}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in again.stdout
    assert _metrics(run) == _metrics(tmp_path / "ref")  # every step once, bit for bit
