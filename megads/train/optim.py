"""Optimizer construction: torch.optim.AdamW with Megatron-style weight-decay groups.

Two parameter groups: `decay` (matrices, the output head, the embedding unless
`decay_embedding` is false) and `no_decay` (every 1-D parameter: RMSNorm weights and biases).
Buffers such as the routers' selection bias are not parameters, so they can never enter a
group. The learning rate in the groups is set by the step executor on every step.

A ZeRO-1 executor (megads.parallel) replaces this function with its sharded optimizer; it
should keep the same grouping rule (`param_groups_for`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from megads.train.config import OptimConfig


def is_no_decay(name: str, param: nn.Parameter, *, decay_embedding: bool = True) -> bool:
    if param.ndim <= 1:
        return True  # norms and biases
    return not decay_embedding and name.endswith("embed_tokens.weight")


def param_groups_for(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig
) -> list[dict[str, object]]:
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    decay_names: list[str] = []
    no_decay_names: list[str] = []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if is_no_decay(name, p, decay_embedding=cfg.decay_embedding):
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "group": "decay", "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay", "names": no_decay_names},
    ]


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig, *, device_type: str = "cpu"
) -> torch.optim.Optimizer:
    """AdamW over `named_params` (e.g. `model.named_parameters()`), lr set later per step."""
    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r}: only 'adamw' is implemented")
    groups = param_groups_for(named_params, cfg)
    fused = cfg.fused if cfg.fused is not None else device_type == "cuda"
    kwargs: dict[str, object] = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(float(cfg.betas[0]), float(cfg.betas[1])), eps=cfg.eps, **kwargs
    )
