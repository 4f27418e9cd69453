"""Token dispatch and combine for routed experts, behind a small interface.

A dispatcher moves the (token, k) pairs chosen by the router to the experts that own them and
brings the expert outputs back:

    dispatch(x_ND, topk_idx_NK) -> DispatchResult(x_MD rows grouped by local expert, groups)
    combine(y_MD, result)       -> y_NKD, expert outputs back in (token, k) order

Host synchronisation. `groups` (rows per local expert, a `GroupCounts`) stays on the device:
the grouped-GEMM kernel takes device offsets, so the local dispatcher and the experts run
without reading anything back to the host (none of the ops here needs a size read back either:
no bincount, nonzero or data-dependent shape). Only the per-expert loop (the fallback where
the kernel cannot run, e.g. bf16 on CPU, and the FP8 emulation) reads the counts, once per layer
for both GEMMs and their backward. The expert-parallel dispatcher must know its all-to-all split
sizes on the host: one read per layer there, shared by dispatch, combine and both backwards
(`megads.parallel.expert_parallel`). docs/performance.md, "Host synchronisation", has the table.

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

from megads.model.linear import GroupCounts


@dataclass
class DispatchResult:
    x_MD: torch.Tensor  # rows grouped by local expert (expert 0 first)
    groups: GroupCounts  # rows per local expert, len = number of local experts (on the device)
    state: dict[str, Any] = field(default_factory=dict)  # whatever combine needs

    @property
    def counts(self) -> list[int]:
        """Rows per local expert as Python ints (a host read, unless the dispatcher had them)."""
        return self.groups.host


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
        expert_M, order_M = torch.sort(flat_M, stable=True)
        # rows per expert from the sorted ids, on the device: the end of expert e's run is the number
        # of ids <= e (bincount would size its output from the largest id: a host read on a GPU)
        bounds_E = torch.arange(1, self.num_local_experts + 1, device=flat_M.device)
        ends_E = torch.searchsorted(expert_M, bounds_E)
        counts_E = torch.diff(ends_E, prepend=ends_E.new_zeros(1))
        x_MD = x_ND.index_select(0, order_M // K)
        return DispatchResult(x_MD=x_MD, groups=GroupCounts(counts_E), state={"order_M": order_M, "N": N, "K": K})

    def combine(self, y_MD: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        # Scatter rows back to (token, k) order. index_copy's backward is a plain gather, cheaper
        # than the scatter-add that the backward of an inverse-permutation gather would need.
        order_M = result.state["order_M"]
        # in place into a fresh buffer: the out-of-place index_copy would first copy the
        # uninitialised buffer it is given
        y_flat_MD = torch.empty_like(y_MD).index_copy_(0, order_M, y_MD)
        # explicit hidden size: with zero tokens a -1 would be ambiguous
        return y_flat_MD.view(result.state["N"], result.state["K"], y_MD.shape[-1])
