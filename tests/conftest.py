"""Fixtures shared by several test modules."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The FP8 emulation's quantisation compiles its kernels on first use (seconds a shape class, in
# every rank process): the suite runs it eagerly, with the same bits, except in the tests of the
# compiled path itself (tests/test_fp8.py) and the slow `small` case of tests/test_fp8_training.py,
# which lift this. Ranks inherit the environment.
os.environ.setdefault("MEGADS_FP8_EAGER_QUANT", "1")


@pytest.fixture
def quiet_transformers() -> Iterator[None]:
    """transformers' loading chatter and deprecation warnings off (the tests compare numbers)."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="session")
def slurm() -> None:
    """A running Slurm (tools/local_slurm.sh starts one as root); skips without one, unless
    MEGADS_REQUIRE_SLURM=1 (set by .ci/run once it started one): then it fails."""
    if not _slurm_up() and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([str(REPO / "tools" / "local_slurm.sh"), "up"], check=False, timeout=600)
    if not _slurm_up():
        if os.environ.get("MEGADS_REQUIRE_SLURM") == "1":
            pytest.fail("MEGADS_REQUIRE_SLURM=1 but no Slurm answers (tools/local_slurm.sh up failed?)")
        pytest.skip("no Slurm here (as root, tools/local_slurm.sh up starts one)")
