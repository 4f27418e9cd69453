"""Every pipeline schedule trains to the end through a batch ramp that crosses odd micro-batch counts.

`megads-train` under torchrun on 4 gloo ranks (pp2 x ep2, dp 2, micro-batches of one sequence),
the tiny model on the fallback data, 6 steps of a ramp 7/8 -> 14 sequences: the raw ramp passes
through 5 and 7 micro-batches per data-parallel rank, which DualPipe (even counts) and interleaved
1F1B (multiples of pp) cannot run. The trainer rounds every ramp value to the schedule's
granularity (`megads.train.schedule.batch_granularity`) and says so at start. DualPipe, the
reported crash (`schedule 'dualpipe': pp=2, num_microbatches=5` mid-run), is in the default
suite; the other four are slow (one launch each). The fast test covering all five is
tests/test_train_schedule.py::test_every_schedule_accepts_every_ramp_value.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from megads.pipeline.schedules import validate_microbatches

from megads.testing.launch import run_trainer

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=tiny", "seq_len=32", "parallel=pp2_ep2", "parallel.micro_batch_size=1", "schedule=tiny",
    "schedule.train_tokens=0", "schedule.train_steps=6", "schedule.warmup_steps=2", "schedule.batch_end=14",
    "schedule.batch_ramp_tokens=1200", "schedule.constant_tokens=5000", "schedule.decay_tokens=1000",
    "logging.console_every=1", "logging.loss_png=false", "logging.expert_load_png=false", "logging.expert_heatmap_png=false",
    "checkpoint.at_end=false", "optim.lr=3e-3", "data=fallback", "data.max_bytes=200000",
]

# (schedule, batch_start, the global batches the run steps through, the start-of-run note)
CASES = {
    # start 8 passes the old check of batch_start alone; the ramp then reaches 10 = 5 micro-batches
    "dualpipe": (8, [8, 8, 8, 8, 12, 12], "end 14 -> 12"),
    "interleaved": (8, [8, 8, 8, 8, 12, 12], "end 14 -> 12"),
    # these take odd counts: start 7 (not a multiple of micro-batch x dp) is rounded up to 8
    "1f1b": (7, [8, 8, 8, 10, 12, 14], "start 7 -> 8"),
    "zb1p": (7, [8, 8, 8, 10, 12, 14], "start 7 -> 8"),
    "dualpipev": (7, [8, 8, 8, 10, 12, 14], "start 7 -> 8"),
}


def _launch(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return run_trainer([*COMMON, f"run_dir={run_dir}", *overrides], nproc=4)


def _check(tmp_path: Path, schedule: str) -> None:
    start, batches, note = CASES[schedule]
    run_dir = tmp_path / schedule
    proc = _launch(run_dir, f"parallel.schedule={schedule}", f"schedule.batch_start={start}")
    hist = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]  # trained to the end
    assert [int(h["batch_sequences"]) for h in hist] == batches
    for b in batches:  # dp 2 x micro-batch 1: M = b / 2, which the schedule accepts
        validate_microbatches(schedule, pp=2, num_microbatches=b // 2)
    assert f"batch ramp rounded to {schedule}'s granularity (pp=2, micro-batch 1 x dp 2: " in proc.stdout
    assert note in proc.stdout


def test_dualpipe_trains_through_a_ramp_crossing_odd_counts(tmp_path: Path) -> None:
    _check(tmp_path, "dualpipe")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["interleaved", "1f1b", "zb1p", "dualpipev"])
def test_schedule_trains_through_a_ramp_crossing_odd_counts(tmp_path: Path, schedule: str) -> None:
    _check(tmp_path, schedule)
