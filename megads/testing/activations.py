"""Measured activation memory: the bytes of the tensors autograd saves for backward, live.

`SavedTensorTracker` is a `torch.autograd.graph.saved_tensors_hooks` context: every tensor an op
saves for its backward is counted once per storage (views and repeated saves of one storage count
once; a parameter's storage never counts) from the moment it is saved until autograd frees the
graph that holds it (the packed handle's finaliser). `live` is the bytes held now, `peak` the
largest `live` seen. Wrapped around a pipeline step it measures the activations at the schedule's
peak of live micro-batches, which is what `megads.plan.memory` predicts.

Not counted (the prediction does not count them either): tensors alive for other reasons than a
saved graph (a stage's received input before its first op saves it, the chunk output the stage
keeps for the backward, gradients in flight), and what `torch.utils.checkpoint` keeps (its own
hooks take over inside a recomputed region), so measurements are for `memory.recompute=none`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class _Packed:
    """The handle autograd stores in place of a saved tensor; its end releases the bytes."""

    __slots__ = ("key", "owner", "t")

    def __init__(self, t: torch.Tensor, key: int | None, owner: SavedTensorTracker) -> None:
        self.t, self.key, self.owner = t, key, owner

    def __del__(self) -> None:
        if self.key is not None:
            self.owner._release(self.key)


class SavedTensorTracker(torch.autograd.graph.saved_tensors_hooks):
    """Counts live saved-for-backward bytes (see the module docstring)."""

    def __init__(self, *, exclude: Iterable[torch.Tensor] = ()) -> None:
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, handles]
        self.live = 0
        self.peak = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> _Packed:
        if t.device.type == "meta":
            return _Packed(t, None, self)
        s = t.untyped_storage()
        key = s.data_ptr()
        if key in self.excluded or s.nbytes() == 0:
            return _Packed(t, None, self)
        ref = self.refs.get(key)
        if ref is None:
            self.refs[key] = [s.nbytes(), 1]
            self.live += s.nbytes()
            self.peak = max(self.peak, self.live)
        else:
            ref[1] += 1
        return _Packed(t, key, self)

    @staticmethod
    def _unpack(p: Any) -> torch.Tensor:
        return p.t

    def _release(self, key: int) -> None:
        ref = self.refs[key]
        ref[1] -= 1
        if ref[1] == 0:
            self.live -= ref[0]
            del self.refs[key]


def pipeline_peak_worker(
    rank: int, world: int, cfg_kwargs: dict[str, Any], cases: list[tuple[str, int, int]], seq_len: int, outdir: str
) -> None:
    """Spawned rank of a pp = world, ep = 1 pipeline: for each (schedule, micro-batches, micro-batch
    size) one optimizer step under a `SavedTensorTracker`; rank r writes its peak bytes per case to
    `outdir/peak_<schedule>_<rank>.pt`. Every rank builds the same seed, so all see the same batch."""
    import os

    from megads.model.config import ModelConfig
    from megads.parallel.config import pieces_per_rank
    from megads.parallel.executor import OptimSettings, ParallelExecutor
    from megads.parallel.mesh import ParallelMesh, plan_layout

    cfg = ModelConfig(**cfg_kwargs)
    for schedule, m, mbs in cases:
        plan = plan_layout(world_size=world, pp=world, ep=1, num_layers=cfg.num_hidden_layers,
                           n_routed_experts=cfg.n_routed_experts, pieces_per_rank=pieces_per_rank(schedule))
        mesh = ParallelMesh.build(plan)
        ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, schedule=schedule, micro_batch_size=mbs, seed=0,
                              optim=OptimSettings(lr=1e-3))
        g = torch.Generator().manual_seed(0)
        tok = torch.randint(0, cfg.vocab_size, (m * mbs, seq_len + 1), generator=g)
        tracker = SavedTensorTracker(exclude=list(ex.model.parameters()))
        with tracker:
            ex.step(tok[:, :-1].contiguous(), tok[:, 1:].contiguous(), mtp_weight=0.3)
        torch.save({"peak": tracker.peak, "live_after": tracker.live, "stage_layers": list(plan.stage_layers)},
                   os.path.join(outdir, f"peak_{schedule}_{rank}.pt"))
