"""A rank's training state as checkpoint entries, by global name, so that it reshards.

Keys of a trainer checkpoint (megads.checkpoint.dcp writes and reads them):

    model.<name>                 the single-process state_dict name; routed experts are boxes
                                 [ep_rank*E/ep, +E/ep) of the global [E, ...] tensor; everything
                                 else is written once whichever ranks hold it (dp and DualPipe
                                 replicas, the last stage's embedding copy)
    optim.<name>.master          ZeRO-1 state of parameter <name> as 1-D tensors over the
    optim.<name>.exp_avg         flattened global parameter (an expert shard's elements sit at
    optim.<name>.exp_avg_sq      ep_rank * local numel): every rank writes the element range it
                                 owns, so any other dp size / bucket size / ep cuts its own
    optim.meta                   {"step", "hyperparameters"}
    run                          {"step", "tokens"}
    loader                       the data loader's state, global and the same on every rank
    rng.rank_<r>                 rank r's RNG states (restored when the same rank exists again)

Loading asks for the keys and boxes of the *current* layout; DCP reads the overlapping parts of
what was saved, so pp, ep, dp, the schedule (DualPipe's replicas, DualPipeV's V) and the stage
split may all differ between the save and the load.
"""

from __future__ import annotations

import hashlib
import pickle
import random
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megads.checkpoint.dcp import MODEL_PREFIX, ShardView, collective_device, load_state, saved_keys
from megads.parallel.executor import ParallelExecutor
from megads.parallel.zero1 import Zero1AdamW

OPTIM_PREFIX = "optim."
_RNG = "rng.rank_{:05d}"


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU, and its own CUDA device), Python, NumPy."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def model_entries(ex: ParallelExecutor) -> dict[str, Any]:
    """model.<name> -> this rank's tensor (a ShardView for an expert shard)."""
    ep, ep_rank = ex.mesh.ep, ex.mesh.ep_rank
    out: dict[str, Any] = {}
    for name, t in ex.model.state_dict().items():
        if name in ex.expert_names and ep > 1:
            local = t.shape[0]
            out[MODEL_PREFIX + name] = ShardView(t, (local * ep, *t.shape[1:]), (ep_rank * local, *[0] * (t.dim() - 1)))
        else:
            out[MODEL_PREFIX + name] = t
    return out


def optimizer_entries(ex: ParallelExecutor) -> dict[str, Any]:
    """optim.<name>.<master|exp_avg|exp_avg_sq> -> ShardView of this rank's owned elements."""
    return zero1_entries(ex.optimizer, ep=ex.mesh.ep, ep_rank=ex.mesh.ep_rank)


def zero1_entries(opt: Zero1AdamW, *, ep: int = 1, ep_rank: int = 0) -> dict[str, Any]:
    """`optimizer_entries` of any Zero1AdamW whose expert parameters are shard `ep_rank` of `ep`."""
    out: dict[str, Any] = {}
    for name, (lo, _hi, numel, kind, views) in opt.shard_views().items():
        start, total = (ep_rank * numel, ep * numel) if kind == "expert" and ep > 1 else (0, numel)
        for key, view in views.items():
            out[f"{OPTIM_PREFIX}{name}.{key}"] = ShardView(view, (total,), (start + lo,))
    return out


def training_entries(ex: ParallelExecutor, *, step: int, tokens: float, loader_state: Any) -> dict[str, Any]:
    """Everything a resume needs from this rank (collective: checks the loader state agrees)."""
    _check_same_everywhere(loader_state, what="data-loader state")
    return {
        **model_entries(ex), **optimizer_entries(ex),
        "optim.meta": {"step": ex.optimizer.step_count, "hyperparameters": ex.optimizer.hyperparameters()},
        "run": {"step": step, "tokens": tokens}, "loader": loader_state,
        _RNG.format(ex.mesh.rank): rng_state(),
    }


def _check_same_everywhere(obj: Any, *, what: str) -> None:
    """Replicated objects are written once: a rank whose copy differs would be lost silently."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    digest = int.from_bytes(hashlib.sha256(pickle.dumps(obj)).digest()[:7], "little")
    device = collective_device()
    lo = torch.tensor([digest], dtype=torch.int64, device=device)
    hi = torch.tensor([digest], dtype=torch.int64, device=device)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if int(lo) != int(hi):
        raise RuntimeError(f"the {what} differs between ranks; it must be global (the same on every rank)")


def load_training_state(folder: str | Path, ex: ParallelExecutor) -> dict[str, Any]:
    """Fill the executor's model and optimizer from `folder` (any layout); returns
    {"step", "tokens", "loader", "rng" (None when this rank number did not exist)}."""
    rng_key = _RNG.format(ex.mesh.rank)
    have_rng = rng_key in saved_keys(folder)
    entries: dict[str, Any] = {**model_entries(ex), **optimizer_entries(ex), "optim.meta": None, "run": None,
                               "loader": None}
    if have_rng:
        entries[rng_key] = None
    load_state(folder, entries)
    meta = entries["optim.meta"]
    ex.optimizer.restore(step=int(meta["step"]), hyperparameters=meta["hyperparameters"])
    run = entries["run"]
    return {"step": int(run["step"]), "tokens": float(run["tokens"]), "loader": entries["loader"],
            "rng": entries[rng_key] if have_rng else None}


def load_model_and_optimizer(folder: str | Path, ex: ParallelExecutor) -> None:
    """The next stage of a staged run: model and optimizer state (moments, step count) from the
    previous stage's final checkpoint, of any layout; the schedule, data and RNG start afresh."""
    entries: dict[str, Any] = {**model_entries(ex), **optimizer_entries(ex), "optim.meta": None}
    load_state(folder, entries)
    meta = entries["optim.meta"]
    ex.optimizer.restore(step=int(meta["step"]), hyperparameters=meta["hyperparameters"])


def load_model_weights(folder: str | Path, ex: ParallelExecutor) -> None:
    """Weights only (`checkpoint.init_from` a megads checkpoint, of any layout): the model's
    tensors from `folder`, then a fresh optimizer on them."""
    load_state(folder, model_entries(ex))
    ex.optimizer.reset_from_params()
