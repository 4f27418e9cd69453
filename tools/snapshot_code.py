"""A frozen copy of megads's code for one Slurm job, importable on its own (launch/slurm.sbatch).

    python tools/snapshot_code.py <repo> <dest>
    python <dest>/megads_train.py <hydra overrides>      # trains with the snapshot's code and configs

A requeued or long-pending job must run the code it was submitted with, not whatever the
checkout holds when it starts. The snapshot holds only code and configs (about 1 MB; no .venv,
outputs, caches or .git) in the layout the package installs as: `pipeline/` and `data/` of the
repository become `megads/pipeline` and `megads/data`, so every `megads.*` import resolves inside
the snapshot and nothing falls through to the editable install of the live checkout.
`megads_train.py` at its root runs `megads.train.cli` with the snapshot first on `sys.path`
(a script's own folder comes first, while `python -m` would put the working directory first),
so the job can keep the submission folder as its working directory: run folders, data caches
and relative paths in overrides stay where they are for a local run, and a resubmission of the
same experiment finds its run folder and resumes it.

Written to `<dest>.tmp` and renamed: a snapshot is complete or absent. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

# repository folder -> where it goes in the snapshot
LAYOUT = {
    "megads": "megads",
    "pipeline": "megads/pipeline",
    "data": "megads/data",
    "conf": "conf",
    "tools": "tools",
    "launch": "launch",
}
KEEP_SUFFIXES = (".py", ".yaml", ".yml", ".sh", ".sbatch", ".typed", ".json", ".txt")
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".hypothesis", ".cache", ".mypy_cache", ".ruff_cache"}

ENTRY = '''"""Run megads-train from this code snapshot (written by tools/snapshot_code.py)."""
import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
runpy.run_module("megads.train.cli", run_name="__main__", alter_sys=True)
'''


def _copy_tree(src: Path, dst: Path) -> int:
    """Copy the code files of `src` into `dst`; returns the bytes copied."""
    total = 0
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        rel = Path(root).relative_to(src)
        for name in sorted(files):
            if not name.endswith(KEEP_SUFFIXES):
                continue
            target = dst / rel / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(root) / name, target)
            total += target.stat().st_size
    return total


def snapshot_code(repo: Path, dest: Path) -> int:
    """Write the snapshot of `repo` to `dest` (kept when it already exists); returns its bytes."""
    if (dest / "megads_train.py").is_file():
        return 0  # a requeued job: the snapshot of its first start
    if not (repo / "megads" / "train" / "cli.py").is_file():
        raise SystemExit(f"snapshot_code: {repo} is not a megads checkout (no megads/train/cli.py)")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    total = 0
    for src, rel in LAYOUT.items():
        if (repo / src).is_dir():
            total += _copy_tree(repo / src, tmp / rel)
    (tmp / "megads_train.py").write_text(ENTRY)
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, dest)
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("repo", type=Path)
    ap.add_argument("dest", type=Path)
    args = ap.parse_args(argv)
    n = snapshot_code(args.repo.resolve(), args.dest.resolve())
    if n:
        print(f"code snapshot: {args.dest} ({n / 1e6:.1f} MB)")
    else:
        print(f"code snapshot: {args.dest} (kept from the job's first start)")


if __name__ == "__main__":
    sys.exit(main())
