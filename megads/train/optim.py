"""Weight-decay groups of AdamW (Megatron-style), handed to megads' ZeRO-1 optimizer.

Two parameter groups: `decay` (matrices, the output head, the embedding unless
`decay_embedding` is false) and `no_decay` (every 1-D parameter: RMSNorm weights and biases).
Buffers such as the routers' selection bias are not parameters, so they can never enter a
group. The learning rate in the groups is set by the step executor on every step.

The optimizer itself is megads.parallel.zero1.Zero1AdamW (sharded or replicated), built by
the executor from these groups; each group carries the parameter names, by which ZeRO-1 state
is saved and loaded.
"""

from __future__ import annotations

from collections.abc import Iterable

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
