"""The one factory through which every GEMM layer of the model is created.

A layer asks for "a linear" (or "a grouped linear" for routed experts) and the factory
decides the backend: native PyTorch here, an FP8 block-scaled backend later (Transformer
Engine on GPUs, its exact emulation on CPU). This is Megatron-Core's "spec" idea without the
global registry: the factory is an explicit argument of the model constructor.

Shapes: N rows (tokens), I input features, O output features, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class GroupedLinear(nn.Module):
    """E independent linears (no bias), weight [E, O, I], applied to rows grouped by expert.

    `forward(x_NI, counts)` runs expert e on rows [offset_e, offset_e + counts[e]); each expert
    runs exactly once on its contiguous slice, no masking over all tokens.
    """

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num = num
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        nn.init.kaiming_uniform_(self.weight.view(-1, in_features), a=math.sqrt(5))

    def forward(self, x_NI: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert len(counts) == self.num, (len(counts), self.num)
        if x_NI.shape[0] == 0:
            return x_NI.new_zeros(0, self.out_features) + 0.0 * self.weight.sum()
        outs = []
        for e, part_nI in enumerate(torch.split(x_NI, counts, dim=0)):
            if counts[e]:
                outs.append(part_nI @ self.weight[e].to(part_nI.dtype).t())
        return torch.cat(outs, dim=0)

    def extra_repr(self) -> str:
        return f"num={self.num}, in_features={self.in_features}, out_features={self.out_features}"


class LinearFactory:
    """Native PyTorch backend. Subclass and override both methods for another backend."""

    name = "native"

    def linear(self, in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def grouped(self, num: int, in_features: int, out_features: int) -> nn.Module:
        return GroupedLinear(num, in_features, out_features)
