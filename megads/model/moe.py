"""DeepSeekMoE: shared experts plus fine-grained routed experts (DeepSeek-V3 §2.1.2).

    h' = h + sum_i SharedFFN_i(h) + sum_{i in topK} g_i RoutedFFN_i(h)

The routed path is exposed as four steps so a pipeline schedule can drive them one by one and
overlap the two all-to-alls with other work:

    routing = moe.route(x)              gate: sigmoid scores, group-limited top-k, balance loss
    d       = moe.dispatch(x, routing)  (token, k) pairs -> rows grouped by expert (all-to-all under EP)
    y       = moe.experts_forward(d)    each local expert runs once on its contiguous slice
    out     = moe.combine(y, d, routing, x)  reverse of dispatch, gate-weighted sum, + shared experts

The communication inside dispatch and combine is the dispatcher's; everything else is a method
here, so a stage that issues the all-to-alls itself (`megads.parallel.stages`) calls the same
pieces: `dispatch_input` (the rows to send, cast to the autocast dtype), `shared_forward`,
`combine_output` (gate-weighted sum + shared experts).

`forward` runs the four steps in order. No token is ever dropped.

Shapes: B batch, T sequence, N = B*T tokens, D hidden, K top-k, M dispatched rows, I expert width.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megads.model.config import ModelConfig
from megads.model.dispatch import DispatchResult, LocalDispatcher, TokenDispatcher
from megads.model.linear import LinearFactory, to_autocast_dtype
from megads.model.mlp import MLP
from megads.model.router import Router, Routing


class RoutedExperts(nn.Module):
    """The routed experts of one layer (or this rank's share of them under expert parallel).

    gate_up_proj: [E, 2I, D] (gate rows first, then up rows), down_proj: [E, D, I].
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, factory: LinearFactory) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = factory.grouped(num_experts, hidden_size, 2 * intermediate_size)
        self.down_proj = factory.grouped(num_experts, intermediate_size, hidden_size)

    def forward(self, x_MD: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        """`counts`: rows per expert (a `GroupCounts` keeps them on the device)."""
        gate_MI, up_MI = self.gate_up_proj(x_MD, counts).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate_MI) * up_MI, counts)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, *, factory: LinearFactory) -> None:
        super().__init__()
        self.n_routed_experts = cfg.n_routed_experts
        self.gate = Router(cfg)
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, factory=factory
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, factory=factory)
            if cfg.n_shared_experts > 0
            else None
        )
        # Not a module: swapped from outside (megads.parallel) when experts are sharded.
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.n_routed_experts)

    # -- the four steps ------------------------------------------------------------
    def route(self, x_BTD: torch.Tensor) -> Routing:
        return self.gate(x_BTD.reshape(-1, x_BTD.shape[-1]), seq_len=x_BTD.shape[1])

    def dispatch_input(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """The rows the dispatch sends, [N, D]. The experts' first GEMM runs in the autocast dtype
        anyway: casting before the dispatch gives the same result and moves half the bytes
        through the all-to-all."""
        return to_autocast_dtype(x_BTD.reshape(-1, x_BTD.shape[-1]))

    def dispatch(self, x_BTD: torch.Tensor, routing: Routing) -> DispatchResult:
        return self.dispatcher.dispatch(self.dispatch_input(x_BTD), routing.topk_idx_NK)

    def experts_forward(self, dispatched: DispatchResult) -> torch.Tensor:
        return self.experts(dispatched.x_MD, dispatched.groups)

    def shared_forward(self, x_BTD: torch.Tensor) -> torch.Tensor | None:
        return self.shared_experts(x_BTD) if self.shared_experts is not None else None

    def combine_output(
        self, y_NKD: torch.Tensor, routing: Routing, shared_BTD: torch.Tensor | None, *, shape_BTD: torch.Size
    ) -> torch.Tensor:
        """Gate-weighted sum of the expert outputs back in (token, k) order, plus the shared experts."""
        weight_NK1 = routing.topk_weight_NK.to(y_NKD.dtype).unsqueeze(-1)
        routed_ND = (y_NKD * weight_NK1).sum(dim=1)
        out_BTD = routed_ND.view(shape_BTD)
        if shared_BTD is not None:
            out_BTD = out_BTD + shared_BTD
        return out_BTD

    def combine(
        self, y_MD: torch.Tensor, dispatched: DispatchResult, routing: Routing, x_BTD: torch.Tensor
    ) -> torch.Tensor:
        y_NKD = self.dispatcher.combine(y_MD, dispatched)
        return self.combine_output(y_NKD, routing, self.shared_forward(x_BTD), shape_BTD=x_BTD.shape)

    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output, sequence-wise balance loss)."""
        routing = self.route(x_BTD)
        dispatched = self.dispatch(x_BTD, routing)
        y_MD = self.experts_forward(dispatched)
        return self.combine(y_MD, dispatched, routing, x_BTD), routing.balance_loss
