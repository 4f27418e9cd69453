"""Checkpoints: atomic step folders and automatic resume.

Layout (format version 1; torch.save files, one file per rank for per-rank state):

    <checkpoint dir>/step_00000100/
        meta.json        written last by rank 0: format, step, tokens, world size, time, and a
                         fingerprint of what a resume must keep (model, data, seq_len, micro-batch)
        model.pt         rank 0: model.state_dict() (router selection biases included: they are
                         persistent buffers); identical on every data-parallel replica
        optim.pt         rank 0: optimizer.state_dict() (AdamW moments and step counts)
        rank_00000.pt    every rank: its data-loader state and RNG states (torch, cuda, python, numpy)

Atomicity: every rank writes into `step_XXXXXXXX.tmp`, all ranks meet at a barrier, then rank 0
writes meta.json and renames the folder to its final name (one `os.replace`), and a second
barrier releases the ranks. A folder without meta.json or with a `.tmp` suffix is never loaded,
so an interrupted save leaves the previous checkpoint as the latest. The checkpoint folder
must be on a file system every rank sees (a single node, or a shared file system).

This is the replicated-data-parallel format of the local executor. Sharded layouts (ZeRO-1,
pipeline, expert parallel) are expected to move to torch.distributed.checkpoint; `load`
refuses a checkpoint written with a different world size.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The completed step folder with the highest step, or None."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and (child / "meta.json").is_file():
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, child)
    return best[1] if best else None


def save_checkpoint(
    ckpt_dir: str | Path,
    *,
    step: int,
    tokens: float,
    rank: int,
    world_size: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader_state: Any,
    keep_last: int,
    fingerprint: str = "",
    sharded: bool = False,
    full_model_on_rank0: bool = True,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Collective: every rank calls it. Returns the final folder.

    `sharded` (megads.parallel executors): every rank saves its own optimizer shard
    (`optim_rank_XXXXX.pt`) and, unless rank 0 holds the whole model (`full_model_on_rank0`,
    pp = ep = 1), its own share of the model (`model_rank_XXXXX.pt`).

    `fingerprint` identifies what a resume must not change (model, data, seq_len, micro-batch).
    `extra_meta` goes into meta.json as it is (the trainer records the model config and the
    parallel layout there, so that `megads-convert` and a resume can read them without the run).
    """
    root = Path(ckpt_dir)
    final = root / step_dir_name(step)
    tmp = root / (step_dir_name(step) + ".tmp")
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"loader": loader_state, "rng": rng_state()}, tmp / f"rank_{rank:05d}.pt")
    if sharded:
        torch.save(optimizer.state_dict(), tmp / f"optim_rank_{rank:05d}.pt")
        if not full_model_on_rank0:
            torch.save(model.state_dict(), tmp / f"model_rank_{rank:05d}.pt")
    if rank == 0 and full_model_on_rank0:
        torch.save(model.state_dict(), tmp / "model.pt")
    if rank == 0 and not sharded:
        torch.save(optimizer.state_dict(), tmp / "optim.pt")
    _barrier()
    if rank == 0:
        meta = {
            "format": FORMAT_VERSION, "step": step, "tokens": tokens, "world_size": world_size,
            "fingerprint": fingerprint, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sharded": sharded, **(extra_meta or {}),
        }
        meta_tmp = tmp / "meta.json.tmp"
        meta_tmp.write_text(json.dumps(meta, indent=1))
        os.replace(meta_tmp, tmp / "meta.json")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            done = sorted(p for p in root.iterdir() if _STEP_RE.match(p.name) and (p / "meta.json").is_file())
            for old in done[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(
    path: str | Path,
    *,
    rank: int,
    world_size: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sharded: bool = False,
) -> dict[str, Any]:
    """Load model and optimizer state; return {step, tokens, loader, rng} for this rank."""
    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise ValueError(f"{path}: not a completed checkpoint (no meta.json); point checkpoint.resume at a step_* folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    if meta["world_size"] != world_size:
        raise ValueError(
            f"{meta_path}: written by {meta['world_size']} ranks, resumed with {world_size}; resume with the "
            "same number of ranks (per-rank data-loader state), or start a new run_dir"
        )
    if bool(meta.get("sharded", False)) != sharded:
        raise ValueError(
            f"{meta_path}: written with {'per-rank (megads.parallel)' if meta.get('sharded') else 'replicated'} "
            "model/optimizer state but this run uses the other kind; resume with the same parallel layout"
        )
    own_model = path / f"model_rank_{rank:05d}.pt"
    model_file = own_model if own_model.is_file() else path / "model.pt"
    model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=False))
    if sharded:
        # ZeRO-1 state is saved by parameter name: this rank's shard (of the current bucket layout) is
        # cut from the files of the ranks it shares groups with, read one at a time and only as far as
        # needed (an unchanged layout reads this rank's own file)
        peers = optimizer.state_peer_ranks()  # type: ignore[attr-defined]

        def peer_states() -> Any:
            for r in peers:
                f = path / f"optim_rank_{r:05d}.pt"
                if not f.is_file():
                    raise ValueError(
                        f"{f}: missing; rank {rank} rebuilds its optimizer state from the files of ranks {peers}"
                    )
                yield torch.load(f, map_location="cpu", weights_only=False)

        optimizer.load_state_dict(peer_states())
    else:
        optimizer.load_state_dict(torch.load(path / "optim.pt", map_location="cpu", weights_only=False))
    per_rank = torch.load(path / f"rank_{rank:05d}.pt", map_location="cpu", weights_only=False)
    return {
        "step": int(meta["step"]), "tokens": float(meta["tokens"]), "loader": per_rank["loader"],
        "rng": per_rank["rng"],
    }
