"""Hydra run folders as Hydra users expect them (issue 9, defect 3).

`megads-train -m optim.lr=1e-3,2e-3 ...` used to give both jobs one run folder (named after
the model and schedule only), so job 2 resumed job 1's finished checkpoint and trained
nothing. Each job of a sweep now trains in its own folder under hydra.sweep.dir, and
hydra.run.dir is the folder of a single run. The sweep runs an expert-parallel layout (ep 2):
megads-train, started as one process, starts the 2 ranks of each job itself (the main job's
DualPipeV pp2 x ep2 takes 4 ranks a job and twice the time; `make train` runs that layout).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from megads.testing.launch import run_trainer

REPO = Path(__file__).resolve().parents[1]
SHORT = ["model=tiny", "seq_len=32", "schedule.warmup_steps=1", "data=fallback", "data.max_bytes=200000",
         "logging.console_every=1"]


def _megads_train(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_trainer(args, nproc=1, cwd=cwd)  # one process: megads-train starts the ranks itself


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss/lm"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_sweep_job_trains_in_its_own_folder(tmp_path: Path) -> None:
    _megads_train(tmp_path, "-m", "optim.lr=1e-3,2e-3", "schedule.train_steps=3", "parallel=ep", *SHORT,
                  f"hydra.sweep.dir={tmp_path / 'sweep'}")
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"], jobs
    assert "optim.lr=0.001" in jobs[0].name and "optim.lr=0.002" in jobs[1].name
    first, second = (_losses(j) for j in jobs)
    assert len(first) == len(second) == 3  # both trained all their steps: nothing resumed
    assert first[0] == second[0] and first[-1] != second[-1]  # same start, different learning rates
    for job in jobs:
        assert (job / "checkpoints" / "step_00000003" / "meta.json").is_file()
        assert "lr: 0.00" in (job / "config.yaml").read_text()


def test_hydra_run_dir_is_the_run_folder(tmp_path: Path) -> None:
    _megads_train(tmp_path, "parallel=single", "schedule.train_steps=1", "schedule.batch_start=2",
                  "schedule.batch_end=2", *SHORT, "hydra.run.dir=runs/one")
    run = tmp_path / "runs" / "one"
    assert (run / "metrics.jsonl").is_file() and (run / "config.yaml").is_file()
    assert not (tmp_path / "outputs").exists()
