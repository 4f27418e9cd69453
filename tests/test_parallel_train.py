"""`megads-train` under torchrun with a 3D layout: pp2 x ep2 on 4 gloo ranks (slow).

Checks that the trainer runs the parallel executor end to end: falling LM loss, rank 0's
metrics carry the expert load of every MoE layer (stage 0's layers and stage 1's layers and
the MTP block, aggregated across ranks), every rank writes its DCP file, and a resumed run (same
layout, and dp2 on 2 ranks) reproduces the uninterrupted one's losses. The default suite covers the same executor through
tests/test_parallel_equivalence.py; this test covers the trainer wiring.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from megads.testing.launch import run_trainer

REPO = Path(__file__).resolve().parents[1]
COMMON = [
    "model=tiny", "seq_len=32", "parallel=pp2_ep2", "parallel.micro_batch_size=2", "schedule=tiny",
    "schedule.train_tokens=0", "schedule.warmup_steps=2", "schedule.batch_start=8", "schedule.batch_end=8",
    "schedule.batch_ramp_tokens=0", "schedule.constant_tokens=5000", "schedule.decay_tokens=1000",
    "logging.console_every=1", "optim.lr=3e-3", "data=fallback", "data.max_bytes=400000",
]


def _launch(run_dir: Path, *overrides: str, nproc: int = 4) -> subprocess.CompletedProcess[str]:
    return run_trainer([*COMMON, f"run_dir={run_dir}", *overrides], nproc=nproc)


def _metrics(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_pp2_ep2_trains_logs_global_load_and_resumes(tmp_path: Path) -> None:
    ref_dir = tmp_path / "ref"
    proc = _launch(ref_dir, "schedule.train_steps=8", "checkpoint.every_steps=4")
    hist = _metrics(ref_dir)
    assert len(hist) == 8
    assert hist[-1]["loss/lm"] < hist[0]["loss/lm"]
    # tiny model: layers 1..3 are MoE (stage 0 holds layers 0-1, stage 1 layers 2-3 + MTP)
    load_keys = {k for k in hist[-1] if k.startswith("load/imbalance/")}
    assert {"load/imbalance/layers.1", "load/imbalance/layers.2", "load/imbalance/layers.3",
            "load/imbalance/mtp.0.block"} <= load_keys, load_keys
    assert "rank 3/4: pp 1/2" in proc.stdout + proc.stderr
    step4 = ref_dir / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in step4.glob("__*_0.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    assert (step4 / "manifest.json").is_file() and (step4 / "meta.json").is_file()
    # resume from step 4 in a new folder, under the same layout and under plain dp2 on 2 ranks
    # (the checkpoint reshards): the losses of the uninterrupted run
    for name, extra, nproc in (("res", (), 4), ("res_dp2", ("parallel=dp",), 2)):
        res_dir = tmp_path / name
        (res_dir / "checkpoints").mkdir(parents=True)
        shutil.copytree(step4, res_dir / "checkpoints" / "step_00000004")
        (res_dir / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in hist[:4]))
        proc = _launch(res_dir, "schedule.train_steps=8", *extra, nproc=nproc)
        resumed = _metrics(res_dir)
        got = [h["loss/total"] for h in resumed[4:8]]
        assert got == pytest.approx([h["loss/total"] for h in hist[4:8]], rel=1e-6), name
    assert "resharded on load" in proc.stdout + proc.stderr


def test_dualpipev_run_trains_and_writes_the_measured_timeline(tmp_path: Path) -> None:
    """Issue 5's real run: `parallel.schedule=dualpipev` on 4 ranks (pp2 x ep2), with the F&B
    overlap executor, MTP and ZeRO-1: LM loss falls and the per-rank timeline PNG of one
    measured step is written."""
    run_dir = tmp_path / "dpv"
    proc = _launch(
        run_dir, "schedule.train_steps=6", "parallel.schedule=dualpipev", "parallel.micro_batch_size=1",
        "checkpoint.every_steps=0",
    )
    hist = _metrics(run_dir)
    assert len(hist) == 6
    assert hist[-1]["loss/lm"] < hist[0]["loss/lm"] - 0.1, [h["loss/lm"] for h in hist]
    png = run_dir / "pipeline_timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pipeline_timeline.png" in proc.stdout + proc.stderr
