"""Token dispatch and combine for routed experts, behind a small interface.

A dispatcher moves the (token, k) pairs chosen by the router to the experts that own them and
brings the expert outputs back:

    dispatch(x_ND, topk_idx_NK) -> DispatchResult(x_MD rows grouped by local expert, counts)
    combine(y_MD, result)       -> y_NKD, expert outputs back in (token, k) order

`LocalDispatcher` (one process holds every expert) is a stable sort by expert id. The
expert-parallel all-to-all dispatcher lives in `megads.parallel` and implements the same
interface, so the model math never changes when parallelism is applied from outside; a DeepEP
backend would be a third implementation.

Shapes: N tokens, K top-k, D hidden, M rows received by this rank's experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class DispatchResult:
    x_MD: torch.Tensor  # rows grouped by local expert (expert 0 first)
    counts: list[int]  # rows per local expert, len = number of local experts
    state: dict[str, Any] = field(default_factory=dict)  # whatever combine needs


class TokenDispatcher(Protocol):
    num_local_experts: int

    def dispatch(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor) -> DispatchResult: ...

    def combine(self, y_MD: torch.Tensor, result: DispatchResult) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts on this process: sort (token, k) pairs by expert id."""

    def __init__(self, num_experts: int) -> None:
        self.num_local_experts = num_experts

    def dispatch(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor) -> DispatchResult:
        N, K = topk_idx_NK.shape
        flat_M = topk_idx_NK.reshape(-1)
        order_M = torch.argsort(flat_M, stable=True)
        counts = torch.bincount(flat_M, minlength=self.num_local_experts).tolist()
        x_MD = x_ND.index_select(0, order_M // K)
        return DispatchResult(x_MD=x_MD, counts=counts, state={"order_M": order_M, "N": N, "K": K})

    def combine(self, y_MD: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        # Scatter rows back to (token, k) order. index_copy's backward is a plain gather, cheaper
        # than the scatter-add that the backward of an inverse-permutation gather would need.
        order_M = result.state["order_M"]
        y_flat_MD = y_MD.new_empty(y_MD.shape).index_copy(0, order_M, y_MD)
        # explicit hidden size: with zero tokens a -1 would be ambiguous
        return y_flat_MD.view(result.state["N"], result.state["K"], y_MD.shape[-1])
