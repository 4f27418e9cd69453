"""Expert parallelism: routed experts sharded over the ep group, tokens moved by all-to-all.

Rank r of an ep group of size P holds experts [r*E/P, (r+1)*E/P) of every MoE layer
(`shard_experts` rebuilds each `RoutedExperts` with its E/P experts and swaps the MoE's
`dispatcher`). `AllToAllDispatcher` implements `megads.model.dispatch.TokenDispatcher`:

    dispatch (token, k) pairs, N*K of them:
      1. stable sort of the pairs by global expert id -> rows grouped by destination rank, then
         by that rank's local expert
      2. exchange of per-(rank, local expert) counts (an all-to-all of P x E/P integers), read
         back to the host once: the layer's only host synchronisation (the uneven all-to-alls
         need their split sizes as Python ints), shared by combine and both backwards
      3. `all_to_all_single` of the rows with uneven splits (autograd: backward = reverse all-to-all)
      4. received rows come grouped (source rank, local expert); permute them to
         (local expert, source rank) so each local expert runs once on a contiguous slice
    combine: the inverse of 4, the reverse all-to-all, the inverse of 1 -> y_NKD; the MoE then
    takes the gate-weighted sum (dropless: every pair goes and comes back).

Both directions can run as two steps, `*_start` (returns a handle whose all-to-all is in flight,
`async_op=True`) and `handle.wait()`, so a schedule can overlap the exchange with other compute;
`dispatch`/`combine` are the synchronous composition the MoE module calls, whose backward
all-to-alls run synchronously inside autograd. A stage that cuts its graph at the exchanges
(`megads.parallel.overlap_stage`) sends the gradients back itself with `dispatch_backward_start`
/ `combine_backward_start`: the reverse all-to-all, asynchronous, with the permutations above
applied by hand (a permutation's gradient is the inverse permutation, the token-to-row
gather's gradient an `index_add`). Only this class reads its exchange record (`result.state`).
A DeepEP backend would be another class with these methods.

Node-limited routing needs no code here: with n_group expert groups laid out so that a group
never straddles two nodes (checked by `plan_layout`), the router's group-limited top-k
(topk_group = M) sends a token to at most M nodes. `nodes_reached` measures it.

Shapes: N tokens, K top-k, D hidden, M rows this rank's experts receive, S rows this rank sends
(S = N*K), P ep ranks, L local experts (E/P).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from megads.model.dispatch import DispatchResult
from megads.model.linear import GroupCounts
from megads.model.moe import MoE


class RowCodec(Protocol):
    """How dispatched rows cross the all-to-all when not as they are (FP8 dispatch)."""

    def row_bytes(self, d: int) -> int: ...

    def encode(self, x_SD: torch.Tensor) -> torch.Tensor: ...

    def decode(self, packed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor: ...


@dataclass
class _Pending:
    """An asynchronous all-to-all in flight: its work handle and the buffers it uses."""

    work: Any = None
    keep: list[torch.Tensor] = field(default_factory=list)
    on_wait: Callable[[float], None] | None = None  # told the seconds this rank blocked in wait()
    after: Callable[[], None] | None = None  # run once the exchange is complete (decode the rows)

    def wait(self) -> None:
        if self.work is not None:
            t0 = time.perf_counter()
            self.work.wait()
            if self.on_wait is not None:
                self.on_wait(time.perf_counter() - t0)
            self.work = None
            if self.after is not None:
                self.after()
                self.after = None
        self.keep.clear()


class _AllToAll(torch.autograd.Function):
    """`all_to_all_single` of rows with uneven splits; backward is the reverse all-to-all."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_SD: torch.Tensor,
        out_splits: list[int],
        in_splits: list[int],
        group: dist.ProcessGroup | None,
        pending: _Pending,
        codec: RowCodec | None = None,
    ) -> torch.Tensor:
        ctx.group, ctx.out_splits, ctx.in_splits = group, out_splits, in_splits
        x_SD = x_SD.contiguous()
        out_MD = x_SD.new_empty((sum(out_splits), *x_SD.shape[1:]))
        if codec is None:
            send, recv = x_SD, out_MD
        else:  # the rows travel encoded (FP8 dispatch); decoded into out_MD once they arrived
            send = codec.encode(x_SD)
            recv = send.new_empty((out_MD.shape[0], send.shape[1]))
            d = x_SD.shape[1]

            def decode_into_output() -> None:
                with torch.no_grad():  # fill the Function's output: not an operation of the graph
                    out_MD.copy_(codec.decode(recv, d, out_MD.dtype))

            pending.after = decode_into_output
        pending.work = dist.all_to_all_single(
            recv, send, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group, async_op=True
        )
        pending.keep += [send, recv]
        return out_MD

    @staticmethod
    def backward(ctx: Any, grad_MD: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_MD = grad_MD.contiguous()
        grad_SD = grad_MD.new_empty((sum(ctx.in_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(
            grad_SD, grad_MD, output_split_sizes=ctx.in_splits, input_split_sizes=ctx.out_splits, group=ctx.group
        )
        return grad_SD, None, None, None, None, None


def all_to_all_rows(
    x_SD: torch.Tensor,
    *,
    out_splits: list[int],
    in_splits: list[int],
    group: dist.ProcessGroup | None,
    on_wait: Callable[[float], None] | None = None,
    codec: RowCodec | None = None,
) -> tuple[torch.Tensor, _Pending]:
    """Start a differentiable uneven all-to-all of rows; read the result only after `pending.wait()`
    (`on_wait` is told how long that wait blocked). `codec`: the rows cross encoded (FP8 dispatch)
    and arrive decoded; the backward sends the rows' gradients unencoded."""
    pending = _Pending(on_wait=on_wait)
    out = _AllToAll.apply(x_SD, out_splits, in_splits, group, pending, codec)
    return out, pending


@dataclass
class DispatchHandle:
    """A dispatch in flight; `wait()` returns the `DispatchResult` for the local experts."""

    rows_MD: torch.Tensor  # received rows, (source rank, local expert) order; valid after the wait
    pending: _Pending
    perm_M: torch.Tensor  # received row order -> (local expert, source rank) order
    groups: GroupCounts  # rows per local expert, on the device and (from the split exchange) the host
    state: dict[str, Any]

    def wait(self) -> DispatchResult:
        self.pending.wait()
        x_MD = self.rows_MD.index_select(0, self.perm_M)
        return DispatchResult(x_MD=x_MD, groups=self.groups, state=self.state)


@dataclass
class CombineHandle:
    """A combine in flight; `wait()` returns the expert outputs in (token, k) order, [N, K, D]."""

    rows_SD: torch.Tensor  # returned rows in sorted (expert id) order; valid after the wait
    pending: _Pending
    state: dict[str, Any]

    def wait(self) -> torch.Tensor:
        self.pending.wait()
        st = self.state
        y_SD = self.rows_SD.index_select(0, st["unsort_S"])
        return y_SD.view(st["N"], st["K"], y_SD.shape[-1])


@dataclass
class GradHandle:
    """A reverse all-to-all of the backward in flight; `wait()` returns the sent value's gradient."""

    pending: Any  # waitable: the all-to-all work
    finish: Callable[[], torch.Tensor]  # the local permutation after the exchange

    def wait(self) -> torch.Tensor:
        self.pending.wait()
        return self.finish()


class AllToAllDispatcher:
    """Token dispatcher over an expert-parallel group (see the module docstring)."""

    def __init__(
        self,
        num_experts: int,
        *,
        group: dist.ProcessGroup | None,
        ep_size: int,
        ep_rank: int,
        ranks_per_node: int | None = None,
    ) -> None:
        if num_experts % ep_size:
            raise ValueError(f"n_routed_experts={num_experts} is not divisible by ep={ep_size}")
        self.num_experts = num_experts
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.num_local_experts = num_experts // ep_size
        self.ranks_per_node = ranks_per_node or ep_size
        # Rows this rank sent in dispatch since the last `reset_volume` (for the benchmark).
        self.sent_rows = 0
        self.sent_remote_rows = 0
        self.sent_bytes = 0  # bytes of the rows this rank sent in dispatch (their dtype decides)
        self.max_nodes_per_token = 0  # most nodes one token reached since the last reset
        self.nodes_reached_sum = 0  # sum over dispatched tokens of the nodes each reached (mean = / tokens)
        self.tokens_dispatched = 0
        self.wait_s = 0.0  # seconds this rank blocked waiting for its forward exchanges (the exposed part)
        # Set from outside for FP8 dispatch (megads.model.fp8.Fp8RowCodec): rows cross encoded.
        self.row_codec: RowCodec | None = None

    def reset_volume(self) -> None:
        self.sent_rows = 0
        self.sent_remote_rows = 0
        self.sent_bytes = 0
        self.max_nodes_per_token = 0
        self.nodes_reached_sum = 0
        self.tokens_dispatched = 0
        self.wait_s = 0.0

    def _waited(self, seconds: float) -> None:
        self.wait_s += seconds

    # -- dispatch ---------------------------------------------------------------------------------
    def dispatch_start(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor) -> DispatchHandle:
        N, K = topk_idx_NK.shape
        P, L = self.ep_size, self.num_local_experts
        dev = topk_idx_NK.device
        flat_S = topk_idx_NK.reshape(-1)
        expert_S, sort_S = torch.sort(flat_S, stable=True)
        unsort_S = torch.empty_like(sort_S)
        unsort_S[sort_S] = torch.arange(sort_S.numel(), device=dev)
        # rows per global expert from the sorted ids (no bincount: its output size is a host read)
        ends_E = torch.searchsorted(expert_S, torch.arange(1, self.num_experts + 1, device=dev))
        send_counts_PL = torch.diff(ends_E, prepend=ends_E.new_zeros(1)).view(P, L)
        recv_counts_PL = torch.empty_like(send_counts_PL)
        # counts: row p of send_counts goes to rank p; received row p came from rank p.
        dist.all_to_all_single(recv_counts_PL.view(-1), send_counts_PL.reshape(-1).contiguous(), group=self.group)
        # The one host read of the layer: all_to_all_single needs its split sizes as Python ints
        # (so does the dropless receive buffer's size). Both directions' counts and the node
        # diagnostics come back in one copy; combine and the two backward exchanges reuse them.
        nodes = self.ranks_per_node < self.ep_size and N > 0  # on one node every token reaches exactly one
        host_parts = [send_counts_PL.reshape(-1), recv_counts_PL.reshape(-1)]
        if nodes:
            nodes_N = self.nodes_reached(topk_idx_NK)
            host_parts.append(torch.stack([nodes_N.max(), nodes_N.sum()]).to(send_counts_PL.dtype))
        host = torch.cat(host_parts).tolist()
        send_counts = [host[p * L:(p + 1) * L] for p in range(P)]
        recv_counts = [host[P * L + p * L:P * L + (p + 1) * L] for p in range(P)]
        in_splits = [sum(r) for r in send_counts]
        out_splits = [sum(r) for r in recv_counts]
        self.sent_rows += sum(in_splits)
        self.sent_remote_rows += sum(in_splits) - in_splits[self.ep_rank]
        self.tokens_dispatched += N
        if nodes:
            self.max_nodes_per_token = max(self.max_nodes_per_token, host[2 * P * L])
            self.nodes_reached_sum += host[2 * P * L + 1]
        elif N:
            self.max_nodes_per_token = max(self.max_nodes_per_token, 1)
            self.nodes_reached_sum += N
        x_SD = x_ND.index_select(0, sort_S // K)
        codec = self.row_codec
        row_bytes = codec.row_bytes(x_SD.shape[1]) if codec is not None else x_SD.shape[1] * x_SD.element_size()
        self.sent_bytes += x_SD.shape[0] * row_bytes
        rows_MD, pending = all_to_all_rows(x_SD, out_splits=out_splits, in_splits=in_splits, group=self.group,
                                           on_wait=self._waited, codec=codec)
        # Received blocks are (source p, local expert l) with recv_counts[p][l] rows; sort by (l, p).
        # Built from the device counts (a tensor made from the host lists would be a host-to-device
        # copy, itself synchronous); output_size spares repeat_interleave a read of its length.
        key_PL = torch.arange(L, device=dev).unsqueeze(0) * P + torch.arange(P, device=dev).unsqueeze(1)
        key_M = torch.repeat_interleave(key_PL.reshape(-1), recv_counts_PL.reshape(-1), output_size=sum(out_splits))
        perm_M = torch.argsort(key_M, stable=True)
        groups = GroupCounts(recv_counts_PL.sum(0), host=[sum(c) for c in zip(*recv_counts)])
        state = {
            "N": N, "K": K, "sort_S": sort_S, "unsort_S": unsort_S, "perm_M": perm_M,
            "in_splits": in_splits, "out_splits": out_splits,
        }
        return DispatchHandle(rows_MD=rows_MD, pending=pending, perm_M=perm_M, groups=groups, state=state)

    def dispatch(self, x_ND: torch.Tensor, topk_idx_NK: torch.Tensor) -> DispatchResult:
        return self.dispatch_start(x_ND, topk_idx_NK).wait()

    # -- combine ----------------------------------------------------------------------------------
    def combine_start(self, y_MD: torch.Tensor, result: DispatchResult) -> CombineHandle:
        st = result.state
        perm_M = st["perm_M"]
        inv_M = torch.empty_like(perm_M)
        inv_M[perm_M] = torch.arange(perm_M.numel(), device=perm_M.device)
        y_back_MD = y_MD.index_select(0, inv_M)  # (local expert, source) -> (source, local expert)
        rows_SD, pending = all_to_all_rows(
            y_back_MD, out_splits=st["in_splits"], in_splits=st["out_splits"], group=self.group,
            on_wait=self._waited,
        )
        return CombineHandle(rows_SD=rows_SD, pending=pending, state=st)

    def combine(self, y_MD: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return self.combine_start(y_MD, result).wait()

    # -- backward of both, for a stage that cuts its graph at the exchanges ------------------------
    def dispatch_backward_start(self, grad_x_MD: torch.Tensor, result: DispatchResult) -> GradHandle:
        """Gradient of the dispatched rows -> gradient of `dispatch_start`'s x_ND, [N, D]."""
        st = result.state
        inv_M = torch.empty_like(st["perm_M"])
        inv_M[st["perm_M"]] = torch.arange(inv_M.numel(), device=inv_M.device)
        grad_rows_MD = grad_x_MD.index_select(0, inv_M).contiguous()  # back to (source, local expert)
        grad_SD, pending = all_to_all_rows(
            grad_rows_MD, out_splits=st["in_splits"], in_splits=st["out_splits"], group=self.group
        )

        def finish() -> torch.Tensor:
            token_S = st["sort_S"] // st["K"]  # sorted row -> token
            return grad_SD.new_zeros((st["N"], grad_SD.shape[-1])).index_add_(0, token_S, grad_SD)

        return GradHandle(pending=pending, finish=finish)

    def combine_backward_start(self, grad_y_NKD: torch.Tensor, result: DispatchResult) -> GradHandle:
        """Gradient of the combined outputs [N, K, D] -> gradient of `combine_start`'s y_MD."""
        st = result.state
        grad_y_SD = grad_y_NKD.reshape(-1, grad_y_NKD.shape[-1])
        grad_rows_SD = grad_y_SD.index_select(0, st["sort_S"]).contiguous()  # (token, k) -> sorted by expert
        grad_MD, pending = all_to_all_rows(
            grad_rows_SD, out_splits=st["out_splits"], in_splits=st["in_splits"], group=self.group
        )
        return GradHandle(pending=pending, finish=lambda: grad_MD.index_select(0, st["perm_M"]))

    # -- diagnostics ------------------------------------------------------------------------------
    def nodes_reached(self, topk_idx_NK: torch.Tensor) -> torch.Tensor:
        """Number of distinct nodes each token's experts live on, [N]."""
        experts_per_node = self.num_local_experts * min(self.ranks_per_node, self.ep_size)
        node_NK = topk_idx_NK // experts_per_node
        n_nodes = max(1, self.num_experts // experts_per_node)
        onehot = torch.zeros(topk_idx_NK.shape[0], n_nodes, dtype=torch.bool, device=topk_idx_NK.device)
        onehot.scatter_(1, node_NK, True)
        return onehot.sum(1)


def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def keep_expert_shard(model: nn.Module, *, ep_size: int, ep_rank: int) -> None:
    """Cut every MoE's routed experts of `model` to rank ep_rank's E/ep_size (on the meta device too).

    Rows [ep_rank*E/P, (ep_rank+1)*E/P) of every [E, ...] expert weight stay; `first_index`
    records the global index of the first, for initialisation and checkpoints. A model already
    cut this way is left as it is.
    """
    if ep_size == 1:
        return
    for moe in model.modules():
        if not isinstance(moe, MoE):
            continue
        E = moe.n_routed_experts
        if E % ep_size:
            raise ValueError(f"n_routed_experts={E} is not divisible by ep={ep_size}")
        L = E // ep_size
        lo = ep_rank * L
        experts = moe.experts
        if experts.num_experts == L and experts.gate_up_proj.first_index == lo:
            continue
        experts.num_experts = L
        for sub in ("gate_up_proj", "down_proj"):
            lin = getattr(experts, sub)
            w = lin.weight
            lin.weight = nn.Parameter(w.data[lo : lo + L].clone(), requires_grad=w.requires_grad)
            lin.num = L
            lin.first_index = lo


def shard_experts(
    model: nn.Module,
    *,
    group: dist.ProcessGroup | None,
    ep_size: int,
    ep_rank: int,
    ranks_per_node: int | None = None,
    row_codec: RowCodec | None = None,
) -> list[str]:
    """Keep this rank's E/ep experts in every MoE of `model` (`keep_expert_shard`, a no-op for a
    model built cut) and install the all-to-all dispatcher (`row_codec`: how the dispatched rows
    cross, e.g. FP8; None: as they are).

    Returns the names of the expert parameters (which ZeRO-1 shards over the expert-data-parallel
    group). With ep_size == 1 the experts stay whole and the local dispatcher is kept.
    """
    keep_expert_shard(model, ep_size=ep_size, ep_rank=ep_rank)
    names: list[str] = []
    for mod_name, moe in model.named_modules():
        if not isinstance(moe, MoE):
            continue
        if ep_size > 1:
            moe.dispatcher = AllToAllDispatcher(
                moe.n_routed_experts, group=group, ep_size=ep_size, ep_rank=ep_rank, ranks_per_node=ranks_per_node
            )
            moe.dispatcher.row_codec = row_codec
        prefix = f"{mod_name}.experts." if mod_name else "experts."
        names.extend(prefix + n for n, _ in moe.experts.named_parameters())
    return names
