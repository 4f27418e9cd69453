"""Run `megads-train` the way a user does: a real subprocess, under torchrun for several ranks.

The end-to-end tests launch the trainer's CLI (`python -m megads.train.cli`) with their own
overrides. `run_trainer` picks a free loopback port, keeps wandb offline and the ranks on one
thread each (2 cores), and fails with the tail of the run's output when it exits non-zero.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trainer_env(*, wandb_mode: str = "disabled") -> dict[str, str]:
    """The environment of a test run: no API key, no inherited rank variables, 1 thread a rank."""
    env = {**os.environ, "WANDB_MODE": wandb_mode, "OMP_NUM_THREADS": "1"}
    for var in ("WANDB_API_KEY", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "SLURM_PROCID"):
        env.pop(var, None)
    return env


def trainer_command(args: Sequence[str], *, nproc: int) -> list[str]:
    """`python -m megads.train.cli ARGS`, under torchrun on a free port when nproc > 1."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
                     "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return [*launcher, "-m", "megads.train.cli", *args]


def run_trainer(
    args: Sequence[str], *, nproc: int, cwd: Path = REPO, wandb_mode: str = "disabled", timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run the trainer to the end; assert it succeeded (the message holds the output's tail)."""
    proc = subprocess.run(trainer_command(args, nproc=nproc), cwd=cwd, env=trainer_env(wandb_mode=wandb_mode),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers below `launcher_pid`."""
    out: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        ranks = [e for e in env if e.startswith(b"RANK=")]
        if ranks and ppid == launcher_pid and b"TORCHELASTIC_RUN_ID" in b"".join(env):
            out[int(ranks[0][5:])] = int(entry.name)
    return out
