"""One transformer block: pre-norm MLA then pre-norm FFN (dense SwiGLU or DeepSeekMoE).

    h   = x + MLA(RMSNorm(x))          -> `attention_step`
    out = h + FFN(RMSNorm(h))          -> `ffn_step` (dense), or for MoE blocks the four steps
                                          route / dispatch / experts / combine of `MoE`

`forward` runs it all; a pipeline schedule that overlaps communication can instead call
`attention_step`, then `ffn_input`, then the MoE steps on `block.mlp`, then add the residual.

Shapes: B batch, T sequence, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from megads.model.attention import MLA
from megads.model.config import ModelConfig
from megads.model.linear import LinearFactory
from megads.model.mlp import MLP
from megads.model.moe import MoE
from megads.model.norm import RMSNorm
from megads.model.rope import RopeCache

__all__ = ["RopeCache", "TransformerBlock"]


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, *, layer_idx: int, factory: LinearFactory) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, factory=factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            MoE(cfg, factory=factory) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, factory=factory)
        )

    def attention_step(self, x_BTD: torch.Tensor, rope: RopeCache) -> torch.Tensor:
        return x_BTD + self.self_attn(self.input_layernorm(x_BTD), rope)

    def ffn_input(self, h_BTD: torch.Tensor) -> torch.Tensor:
        return self.post_attention_layernorm(h_BTD)

    def forward(self, x_BTD: torch.Tensor, rope: RopeCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, balance loss of this block; 0 for dense blocks)."""
        h_BTD = self.attention_step(x_BTD, rope)
        f_BTD = self.ffn_input(h_BTD)
        if self.is_moe:
            y_BTD, balance = self.mlp(f_BTD)
        else:
            y_BTD, balance = self.mlp(f_BTD), h_BTD.new_zeros((), dtype=torch.float32)
        return h_BTD + y_BTD, balance
