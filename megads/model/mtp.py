"""Multi-token prediction (DeepSeek-V3 §2.2).

Module k (1-based) predicts token t_{i+k+1} from the previous depth's representation h^{k-1}_i
and the embedding of t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])
    h^k  = TransformerBlock(h')
    logits = Head(norm(h^k))            (embedding and output head shared with the main model)

The concatenation order (embedding first) is the one of the public checkpoint and of
DeepSeek's own code; the report's equation writes the two halves the other way round.
With input x[0..T) and labels y[i] = x[i+1], depth k uses positions i < T-k:
embedding ids x[k:], targets y[k:], previous states h^{k-1}[:, :T-k].

Shapes: B batch, T sequence, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from megads.model.block import RopeCache, TransformerBlock
from megads.model.config import ModelConfig
from megads.model.linear import LinearFactory
from megads.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, *, depth: int, factory: LinearFactory) -> None:
        super().__init__()
        self.depth = depth  # 1-based
        self.enorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.eh_proj = factory.linear(2 * cfg.hidden_size, cfg.hidden_size)
        # The MTP block sits after the main layers: an MoE block when the model has MoE layers.
        self.block = TransformerBlock(cfg, layer_idx=cfg.num_hidden_layers + depth - 1, factory=factory)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def project(self, h_prev_BTD: torch.Tensor, emb_BTD: torch.Tensor) -> torch.Tensor:
        """h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]), the block's input."""
        return self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_prev_BTD)], dim=-1))

    def forward(
        self, h_prev_BTD: torch.Tensor, emb_BTD: torch.Tensor, rope: RopeCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (h^k before the final norm, normed h^k for the head, balance loss)."""
        h_BTD, balance = self.block(self.project(h_prev_BTD, emb_BTD), rope)
        return h_BTD, self.norm(h_BTD), balance
