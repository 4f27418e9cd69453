"""tools/gpu_check.sh and tools/gpu_fp8_check.py on a machine without a GPU: the script stops at
once with a message that says why, and the FP8 checks run their CPU-capable part (the row-wise
`_scaled_mm` agreement) and say what they skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run in full")
def test_gpu_check_fails_early_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "gc"
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout
    assert "no CUDA device" in (out / "summary.txt").read_text()


def test_fp8_checks_run_on_cpu_and_name_what_they_skip(tmp_path: Path) -> None:
    from tools.gpu_fp8_check import main

    rc = main(["--device", "cpu", "--quick", "--out", str(tmp_path),
               "--only", "torch-rowwise", "torch-blockwise", "te-blockwise"])
    assert rc == 0
    res = json.loads((tmp_path / "fp8_check.json").read_text())
    assert res["torch-rowwise"]["status"] == "ok" and res["torch-rowwise"]["max_rel_diff"] < 1e-5
    assert res["torch-blockwise"]["status"] == "skipped" and "CUDA" in res["torch-blockwise"]["why"]
    assert res["te-blockwise"]["status"] == "skipped" and "CUDA" in res["te-blockwise"]["why"]
