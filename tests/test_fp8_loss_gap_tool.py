"""The statistics of `tools/fp8_loss_gap.py --seeds` (paired FP8 / reference runs per seed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.fp8_loss_gap import paired_gap_stats

REPO = Path(__file__).resolve().parents[1]


def test_paired_gaps_their_standard_error_and_the_reference_spread() -> None:
    ref = {1: 5.0, 2: 5.1, 3: 4.9}
    fp8 = {1: 5.0 * 1.001, 2: 5.1 * 1.003, 3: 4.9 * 0.999}  # gaps +0.1%, +0.3%, -0.1%
    st = paired_gap_stats(ref, fp8)
    assert st["gap_seed1"] == pytest.approx(0.001) and st["gap_seed3"] == pytest.approx(-0.001)
    assert st["mean_gap"] == pytest.approx(0.001)
    assert st["sd_gap"] == pytest.approx(0.002)  # sample standard deviation of (1, 3, -1) x 1e-3
    assert st["stderr_gap"] == pytest.approx(0.002 / 3**0.5)
    assert st["ref_seed_spread"] == pytest.approx(0.02)  # ref / 5.0 - 1 = (0, +2%, -2%)


def test_unpaired_or_single_seed_runs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_gap_stats({1: 5.0, 2: 5.1}, {1: 5.0, 3: 5.1})
    with pytest.raises(ValueError, match="at least 2 seeds"):
        paired_gap_stats({1: 5.0}, {1: 5.0})
    proc = subprocess.run([sys.executable, "-m", "tools.fp8_loss_gap", "--seeds", "7", "7", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--seeds needs at least 2 different seeds" in proc.stderr
