"""Layout-independent parameter initialisation: a tensor's values depend on the seed and its name.

    W[name]            ~ Normal(0, std) from a generator seeded with hash(seed, name)
    W[name][e]         routed experts: row e (global expert index) from hash(seed, name, e)
    norms              ones; biases and the router's selection bias zeros

Names are the single-process model's (`layers.7.mlp.experts.down_proj.weight`): a pipeline stage
keeps the global layer index and an expert shard knows the global index of its first expert
(`GroupedLinear.first_index`), so every rank of every layout draws exactly the numbers one
process would draw for the same tensors, and no rank ever draws (or holds) another rank's.
Values are drawn on the CPU in float32 and copied into the parameter (its device and dtype), so
they do not depend on the device either.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from megads.model.linear import GroupedLinear
from megads.model.norm import RMSNorm
from megads.model.router import Router


def tensor_seed(seed: int, name: str, index: int | None = None) -> int:
    """A 63-bit generator seed for (seed, tensor name[, expert index]), stable across runs."""
    key = f"{seed}/{name}" + ("" if index is None else f"/{index}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def normal_(t: torch.Tensor, *, std: float, seed: int) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


@torch.no_grad()
def init_parameters(model: nn.Module, *, seed: int, std: float) -> None:
    """Initialise every parameter of `model` (skipping meta tensors) as the module docstring says."""
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, GroupedLinear):
            w = module.weight
            if w.is_meta:
                continue
            for j in range(w.shape[0]):
                normal_(w[j], std=std, seed=tensor_seed(seed, prefix + "weight", module.first_index + j))
        elif isinstance(module, (nn.Linear, nn.Embedding, Router)):
            if module.weight.is_meta:
                continue
            normal_(module.weight, std=std, seed=tensor_seed(seed, prefix + "weight"))
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
                module.tokens_per_expert.zero_()
        elif isinstance(module, RMSNorm) and not module.weight.is_meta:
            module.weight.fill_(1.0)
