"""The trainer's hook into megads.parallel: build the parallel executor from a TrainConfig.

`megads.train.trainer.make_executor` calls `build_train_executor` whenever the layout needs more
than plain data parallelism (pp > 1, ep > 1, or ZeRO-1 on several ranks). The executor builds its
own pruned, expert-sharded model under `cfg.seed` (the same initial weights as the single-process
`DeepseekV3(cfg.model)` after `torch.manual_seed(cfg.seed)`), its ZeRO-1 optimizer with the
trainer's weight-decay groups (`megads.train.optim.param_groups_for`), and implements the
trainer's `StepExecutor.run` protocol. The data loader must shard by `mesh.dp_rank` / `mesh.dp`:
every pipeline rank of a data-parallel replica reads the same micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch

from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh


def needs_parallel_executor(parallel: Any, *, world_size: int) -> bool:
    """True when the layout asks for more than replicated data parallelism."""
    return parallel.pp > 1 or parallel.ep > 1 or (parallel.zero1 and world_size > 1)


def build_train_executor(
    cfg: Any, *, world_size: int, local_world_size: int, device: torch.device, autocast_dtype: torch.dtype | None
) -> tuple[ParallelExecutor, ParallelMesh]:
    """Plan (numbers only, raises ValueError naming what clashes), build the mesh and the executor."""
    from megads.train.optim import param_groups_for

    p = cfg.parallel
    plan = p.plan(world_size=world_size, model=cfg.model, ranks_per_node=local_world_size)
    mesh = ParallelMesh.build(plan)
    o = cfg.optim
    if o.name != "adamw":
        raise ValueError(f"optim.name={o.name!r}: only 'adamw' is implemented")
    optim = OptimSettings(
        lr=o.lr, betas=(float(o.betas[0]), float(o.betas[1])), eps=o.eps, weight_decay=o.weight_decay,
        max_grad_norm=o.clip_grad, bucket_numel=p.bucket_numel,
    )
    # The overlapped stage pays off where the schedule has F&B pairs.
    executor_cls: type[ParallelExecutor] = ParallelExecutor
    if p.overlap_fb and p.schedule in ("dualpipe", "dualpipev"):
        from megads.parallel.overlap_stage import OverlapParallelExecutor

        executor_cls = OverlapParallelExecutor
    ex = executor_cls(
        cfg.model, mesh=mesh, plan=plan, schedule=p.schedule, micro_batch_size=p.micro_batch_size, seed=cfg.seed,
        optim=optim, zero1=p.zero1,
        moments_dtype=torch.bfloat16 if p.moments_dtype == "bfloat16" else torch.float32,
        device=device, autocast_dtype=autocast_dtype,
        param_groups_fn=lambda model: param_groups_for(model.named_parameters(), o),
    )
    return ex, mesh


def describe_rank(ex: ParallelExecutor) -> str:
    """One line about what this rank holds (each rank logs its own; rank 0 logs the global figures)."""
    m = ex.model
    layers = [int(k) for k in m.layers.keys()]  # type: ignore[union-attr]
    parts = [f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"]
    if m.embed_tokens is not None:
        parts.append("embedding")
    if m.lm_head is not None:
        parts.append("head + MTP" if m.mtp else "head")
    n = sum(p.numel() for p in m.parameters())
    experts = ex.cfg.n_routed_experts // ex.mesh.ep if ex.cfg.n_routed_experts else 0
    return (
        f"{ex.mesh.describe()}: {', '.join(parts)}; {n / 1e6:.2f}M parameters "
        f"({experts} of {ex.cfg.n_routed_experts} routed experts per MoE layer); optimizer state "
        f"{ex.optimizer.state_bytes() / 2**20:.1f} MiB ({'ZeRO-1' if ex.optimizer.shard else 'replicated'})"
    )
