"""The launch layer without a cluster: the per-job code snapshot and the stage chain's commands."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tools.snapshot_code import snapshot_code  # noqa: E402


def test_the_snapshot_imports_every_megads_module_from_itself(tmp_path: Path) -> None:
    snap = tmp_path / "code"
    size = snapshot_code(REPO, snap)
    assert 0 < size < 5e6, size  # code and configs only
    assert not list(snap.rglob("__pycache__")) and not (snap / ".venv").exists()
    probe = ("import megads.train.cli as c, megads.pipeline as p, megads.data as d, megads.model as m; "
             "print(c.CONF_DIR, p.__file__, d.__file__, m.__file__)")
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(snap)!r}); {probe}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True).stdout.split()
    # the editable install of the checkout must not answer any of them
    assert all(s.startswith(str(snap)) for s in out), out
    assert snapshot_code(REPO, snap) == 0  # a requeued job keeps its first snapshot
    entry = subprocess.run([sys.executable, str(snap / "megads_train.py"), "--help"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert entry.returncode == 0 and "megads" in entry.stdout.lower(), entry.stderr[-2000:]


def test_stages_sh_chains_one_job_per_stage(tmp_path: Path) -> None:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable, "MEGADS_SBATCH": "--nodes 1",
           "MEGADS_SBATCH_ext2048": "--nodes 2"}
    out = subprocess.run([str(REPO / "launch" / "stages.sh"), "stages=tiny_extension", f"run_dir={tmp_path}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3, lines
    for line, name in zip(lines, ["pretrain", "ext512", "ext2048"]):
        assert line.startswith("sbatch --parsable --nodes 1 ") and f"stages.stop={name}" in line, line
        assert f"run_dir={tmp_path}" in line and "launch/slurm.sbatch stages=tiny_extension" in line
    assert "--dependency" not in lines[0] and "afterok" in lines[1] and "afterok" in lines[2]
    assert "--nodes 2" in lines[2] and "--nodes 2" not in lines[1]
    for bad_arg, says in (("stages.stop=ext512", "sets stages.stop per job itself"),
                          ("stages.list.0.overrides=[seq_len=-1]", "seq_len")):
        bad = subprocess.run([str(REPO / "launch" / "stages.sh"), "stages=tiny_extension", bad_arg],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert bad.returncode != 0 and says in bad.stderr and not bad.stdout, (bad_arg, bad.stderr)
