"""SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Used as the dense FFN and as shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megads.model.linear import LinearFactory


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, *, factory: LinearFactory) -> None:
        super().__init__()
        self.gate_proj = factory.linear(hidden_size, intermediate_size)
        self.up_proj = factory.linear(hidden_size, intermediate_size)
        self.down_proj = factory.linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
