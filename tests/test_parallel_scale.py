"""Scale check (slow, outside the default suite): ep = 64 on 64 CPU ranks, exact vs one process.

Runs `tools/parallel_scale_check.py` (which refuses to start when the machine lacks the memory,
about 220 MiB of private memory per rank; then run it with a smaller `--ep` by hand). The
default suite covers the same executor on 4 and 8 ranks (tests/test_parallel_equivalence.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ep64_exact_against_one_process() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.parallel_scale_check", "--ep", "64"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode == 0, out
    assert "exact against one process" in proc.stdout, out
    assert "at most 4 nodes per token" in proc.stdout or "at most 3 nodes" in proc.stdout, out
