"""DeepSeekMoE gating (DeepSeek-V3 §2.1.2): sigmoid affinities, group-limited top-k, bias balancing.

For token t and routed expert i:
    s_i = sigmoid(u_t . e_i)                          (in float32)
    selection uses s_i + b_i, where b is a per-expert bias buffer that no optimizer touches
    group-limited: experts split into n_group groups; a group scores the sum of its top-2
    (s + b); keep the topk_group best groups, pick the top-k experts inside them
    gate g_i = s_i / sum_{selected} s_j * routed_scaling_factor   (the bias never enters g)

The router also (a) accumulates per-expert token counts for the auxiliary-loss-free bias
update (`balance.update_expert_bias`) and (b) computes the complementary sequence-wise
balance loss L = alpha * sum_i f_i P_i with f_i = E/(K*T) * count_i(sequence) and
P_i = mean_t s_i / sum_j s_j.

When a sequence is split over ranks (context parallel), `sequence_sum` is set from outside to a
sum over the holders of each sequence (megads.parallel.context_parallel): the counts and the
length are summed (no gradient), f_i is then the sequence's, and this rank's share of the loss
is alpha * sum_i f_i * (sum over its rows of s_i / sum_j s_j) / T; the holders' shares add up to
the sequence's loss, which is linear in the rows' scores once f is fixed.

Shapes: B batch, T sequence (per sample), N = B*T tokens, D hidden, E routed experts, K top-k,
G groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megads.model.config import ModelConfig


@dataclass
class Routing:
    """The router's decision for N tokens."""

    topk_idx_NK: torch.Tensor  # int64 expert ids
    topk_weight_NK: torch.Tensor  # float32 gate values (with grad)
    balance_loss: torch.Tensor  # scalar, with grad (0 when alpha == 0 or not training)


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.alpha = cfg.seq_aux_loss_alpha
        # initialised here too, so a Router (or MoE) built on its own never holds garbage memory;
        # not on the meta device: a meta normal_ runs torch's Python reference, which imports
        # torch._dynamo (about 1.3 s at every process start that builds a model on meta)
        weight = torch.empty(cfg.n_routed_experts, cfg.hidden_size)
        if not weight.is_meta:
            weight.normal_(std=cfg.initializer_range)
        self.weight = nn.Parameter(weight)
        # Selection bias: a persistent buffer (saved in checkpoints, never seen by the optimizer).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        # Tokens routed to each expert since the last bias update (this rank's share).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)
        # context parallel: sums a [B, X] tensor in place over the holders of each sequence
        self.sequence_sum: Callable[[torch.Tensor], None] | None = None

    def forward(self, x_ND: torch.Tensor, *, seq_len: int) -> Routing:
        """Route N tokens laid out as consecutive sequences of `seq_len` tokens."""
        x_ND = x_ND.reshape(-1, x_ND.shape[-1])
        N = x_ND.shape[0]
        logits_NE = F.linear(x_ND.float(), self.weight.float())
        scores_NE = logits_NE.sigmoid()
        with torch.no_grad():
            choice_NE = scores_NE + self.e_score_correction_bias
            per_group = self.n_experts // self.n_group
            group_score_NG = choice_NE.view(N, self.n_group, per_group).topk(2, dim=-1)[0].sum(-1)
            group_idx = group_score_NG.topk(self.topk_group, dim=-1, sorted=False)[1]
            group_mask_NG = torch.zeros_like(group_score_NG).scatter_(1, group_idx, 1.0)
            expert_mask_NE = group_mask_NG.unsqueeze(-1).expand(N, self.n_group, per_group).reshape(N, self.n_experts)
            choice_NE = choice_NE.masked_fill(expert_mask_NE == 0, float("-inf"))
            topk_idx_NK = choice_NE.topk(self.top_k, dim=-1, sorted=False)[1]
            # bincount's output size depends on the largest id (a host read on a GPU); the same
            # integer counts by a scatter-add into E slots stay on the device
            flat = topk_idx_NK.flatten()
            counts_E = torch.zeros(self.n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
            self.tokens_per_expert += counts_E.float()
        weight_NK = scores_NE.gather(1, topk_idx_NK)
        if self.norm_topk_prob:
            weight_NK = weight_NK / (weight_NK.sum(-1, keepdim=True) + 1e-20)
        weight_NK = weight_NK * self.scaling

        if self.training and self.alpha > 0 and N > 0:
            balance = self.sequence_balance_loss(scores_NE, topk_idx_NK, seq_len=seq_len)
        else:
            balance = scores_NE.new_zeros(())
        return Routing(topk_idx_NK=topk_idx_NK, topk_weight_NK=weight_NK, balance_loss=balance)

    def sequence_balance_loss(self, scores_NE: torch.Tensor, topk_idx_NK: torch.Tensor, *, seq_len: int) -> torch.Tensor:
        """alpha * mean over sequences of sum_i f_i P_i (DeepSeek-V3 eq. 17-20)."""
        N, E = scores_NE.shape
        B, T = N // seq_len, seq_len
        with torch.no_grad():
            counts_BE = torch.zeros(B, E, device=scores_NE.device)
            counts_BE.scatter_add_(1, topk_idx_NK.view(B, T * self.top_k), torch.ones(B, T * self.top_k, device=scores_NE.device))
            if self.sequence_sum is not None:  # a piece of each sequence: the whole one's counts and length
                stats_BX = torch.cat([counts_BE, counts_BE.new_full((B, 1), float(T))], dim=1)
                self.sequence_sum(stats_BX)
                # the whole sequence's length stays a device tensor: reading it would be a host sync
                counts_BE, T_seq = stats_BX[:, :E], stats_BX[0, E]
                f_BE = counts_BE * (E / self.top_k) / T_seq
            else:
                f_BE = counts_BE * (E / (self.top_k * T))
        share_BTE = (scores_NE / scores_NE.sum(-1, keepdim=True)).view(B, T, E)
        p_BE = share_BTE.mean(1) if self.sequence_sum is None else share_BTE.sum(1) / T_seq
        return self.alpha * (f_BE * p_BE).sum(-1).mean()
