"""The per-step work behind a small interface, so parallel executors can replace it.

A `StepExecutor` turns one optimizer step's micro-batches (this rank's share of the global
batch) into an update of the model: forward/backward with gradient accumulation, gradient
synchronisation, clipping, the optimizer step, and the auxiliary-loss-free bias update. It
returns global figures (averaged over the data-parallel ranks) so that rank 0 can log them.

`LocalStepExecutor` runs one full model replica per rank: plain data parallel when a process
group is given (gradients averaged with all-reduce after accumulation, expert-load counts
summed before the bias update), a single process otherwise. megads.parallel supplies
executors for pipeline, expert parallel and ZeRO-1 with the same `run` signature.

Loss normalisation: each micro-batch loss is a mean over its tokens; the gradient of a step is
the mean over all micro-batches of all ranks (every rank runs the same number of them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from megads.model.balance import LoadStats, update_expert_bias

MicroBatch = dict[str, torch.Tensor]  # {"input_ids": [mb, T], "labels": [mb, T]}


@dataclass
class StepMetrics:
    loss: float  # total loss (LM + lambda * MTP + balance), mean over the global batch
    lm: float
    mtp: float
    balance: float
    grad_norm: float  # global norm before clipping
    tokens: int  # tokens in the global batch
    micro_batches: int  # micro-batches per rank
    expert_load: dict[str, LoadStats] = field(default_factory=dict)

    @property
    def load_imbalance(self) -> float:
        """Mean over routers of max/mean expert load (0 without MoE layers)."""
        vals = [s.imbalance for s in self.expert_load.values()]
        return sum(vals) / len(vals) if vals else 0.0


class StepExecutor(Protocol):
    def run(
        self,
        micro_batches: Sequence[MicroBatch],
        *,
        lr: float,
        mtp_weight: float,
        bias_update_speed: float,
        loss_scale: float = 1.0,
    ) -> StepMetrics: ...


class LocalStepExecutor:
    """Gradient accumulation over micro-batches on one model replica (+ DP all-reduce)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        clip_grad: float,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        group: dist.ProcessGroup | None = None,
        bucket_numel: int = 1 << 24,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.clip_grad = clip_grad
        self.device = device
        self.autocast_dtype = autocast_dtype
        self.group = group
        self.dp_size = dist.get_world_size(group) if group is not None else 1
        self.bucket_numel = bucket_numel
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ collectives
    def _sum(self, t: torch.Tensor) -> None:
        if self.group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def _average_grads(self) -> None:
        for p in self.params:
            if p.grad is None:  # e.g. MTP parameters on a step with mtp_weight == 0
                p.grad = torch.zeros_like(p)
        if self.group is None:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for p in self.params + [None]:  # type: ignore[list-item]
            if p is not None:
                bucket.append(p.grad)
                size += p.grad.numel()
            if bucket and (p is None or size >= self.bucket_numel):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                self._sum(flat)
                flat.div_(self.dp_size)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
                bucket, size = [], 0

    # ------------------------------------------------------------------ the step
    def run(
        self,
        micro_batches: Sequence[MicroBatch],
        *,
        lr: float,
        mtp_weight: float,
        bias_update_speed: float,
        loss_scale: float = 1.0,
    ) -> StepMetrics:
        assert micro_batches, "a step needs at least one micro-batch"
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = len(micro_batches)
        sums = torch.zeros(4, dtype=torch.float64)  # total, lm, mtp, balance
        tokens = 0
        for mb in micro_batches:
            ids_BT = mb["input_ids"].to(self.device, non_blocking=True)
            labels_BT = mb["labels"].to(self.device, non_blocking=True)
            tokens += ids_BT.numel()
            ctx = (
                torch.autocast(self.device.type, dtype=self.autocast_dtype)
                if self.autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                out = self.model.compute_loss(ids_BT, labels_BT, mtp_weight=mtp_weight)
            (out.total * (loss_scale / n)).backward()
            sums += torch.stack([out.total.detach(), out.lm, out.mtp, out.balance]).double().cpu()
        self._average_grads()
        if loss_scale != 1.0:
            for p in self.params:
                p.grad.div_(loss_scale)
        if self.clip_grad > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params]))
        if not math.isfinite(grad_norm):
            raise FloatingPointError(
                f"non-finite gradient norm ({grad_norm}); lower optim.lr, use precision=fp32, or check the data"
            )
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        load = update_expert_bias(
            self.model, gamma=bias_update_speed, all_reduce=self._sum if self.group is not None else None
        )
        figures = torch.cat([sums / n, torch.tensor([float(tokens)], dtype=torch.float64)])
        self._sum(figures)
        figures[:4] /= self.dp_size
        total, lm, mtp, balance, global_tokens = figures.tolist()
        return StepMetrics(
            loss=total, lm=lm, mtp=mtp, balance=balance, grad_norm=grad_norm,
            tokens=int(round(global_tokens)), micro_batches=n, expert_load=load,
        )
