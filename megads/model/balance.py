"""Auxiliary-loss-free load balancing: the sign update of the routers' selection bias.

DeepSeek-V3 §2.1.2: after each optimizer step, for every MoE layer,

    b_i += gamma * sign(mean_load - load_i)

so an overloaded expert (load above the mean) loses gamma of selection bias and an
underloaded one gains gamma. `load_i` is the number of (token, expert) assignments the router
made since the last update (its `tokens_per_expert` buffer), summed over the data-parallel
ranks that saw different tokens; the counts are reset afterwards. The bias only changes which
experts are selected, never the gate values, and it is a buffer, so no optimizer touches it.

All routers' counts travel in one concatenated tensor, so a multi-rank run pays a single
all-reduce per step. `all_reduce` sums a tensor in place over the ranks whose tokens differ
(the dense data-parallel group); None means a single replica.

Shapes: E routed experts, R routers (MoE layers, MTP blocks included).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megads.model.router import Router


@dataclass
class LoadStats:
    """Expert load of one router over the last step (all ranks together)."""

    max: float
    mean: float
    min: float
    counts: torch.Tensor  # [E] float32 assignments per expert, on CPU

    @property
    def imbalance(self) -> float:
        """max/mean load (1.0 = perfectly balanced; 0 when no token was routed)."""
        return self.max / self.mean if self.mean > 0 else 0.0


def routers(model: nn.Module) -> dict[str, Router]:
    """Every Router of `model`, by module name (e.g. 'layers.1.mlp.gate', 'mtp.0.block.mlp.gate')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Router)}


@torch.no_grad()
def update_expert_bias(
    model: nn.Module,
    *,
    gamma: float,
    all_reduce: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, LoadStats]:
    """Apply b_i += gamma * sign(mean - load_i) on every router, reset counts, return load stats.

    With gamma == 0 the biases stay as they are, but the counts are still summed, reported and
    reset. Every rank must call this (it may all-reduce).
    """
    found = routers(model)
    if not found:
        return {}
    names = list(found)
    counts_RE = torch.stack([found[n].tokens_per_expert.float() for n in names])  # [R, E]
    if all_reduce is not None:
        all_reduce(counts_RE)
    stats: dict[str, LoadStats] = {}
    for name, load_E in zip(names, counts_RE):
        router = found[name]
        mean = load_E.mean()
        if gamma != 0.0:
            router.e_score_correction_bias.add_(gamma * torch.sign(mean - load_E).to(router.e_score_correction_bias))
        router.tokens_per_expert.zero_()
        cpu = load_E.detach().cpu()
        stats[name] = LoadStats(max=float(cpu.max()), mean=float(cpu.mean()), min=float(cpu.min()), counts=cpu)
    return stats
