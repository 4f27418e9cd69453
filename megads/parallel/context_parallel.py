"""Context parallel: one sequence split over the cp ranks of a stage, MLA exchanging its latent.

Split. A sequence of T tokens is cut into 2*cp equal chunks; rank r of the cp group holds chunks
r and 2*cp-1-r (the zig-zag split of Megatron-Core and torchtitan), so under a causal mask every
rank has the same attention work: an early chunk that sees few keys and a late one that sees many.

    T = 8, cp = 2:   positions 0 1 | 2 3 | 4 5 | 6 7
                     rank        0 |  1  |  1  |  0      rank 0 rows [0 1 6 7], rank 1 [2 3 4 5]

Every cp rank gets the whole micro-batch of token ids (they are tiny); it embeds and runs only
its own rows, in the order above, and those rows are what crosses pipeline stages ([B, T/cp, D]).

Exchange. MLA's keys and values are up-projections of one compressed latent a token,
[c_kv ; RoPE(k_rope)] (kv_lora_rank + qk_rope_head_dim values, 576 for DeepSeek-V3). Each layer
all-gathers that latent over the cp group (rotated with its own positions first, so no rank
needs another's cos/sin), every rank up-projects the keys and values of all positions itself
and attends its queries under a causal mask in global positions. The backward sends back only
latent gradients (a reduce-scatter, done as one all-to-all, which gloo has). Per token and
layer that is 576 values instead of the H * (P + R + V) = 128 * 320 = 40,960 of a key/value
exchange for the 671B config (71x less), bought with cp-fold up-projection compute
(kv_b_proj on every position on every rank). See docs/parallel.md, "Context parallel".

Loss. Each rank computes the cross entropies of its rows divided by the label count of the
*whole* sequence (every rank has all labels), so the cp ranks' losses add up to the
micro-batch's; the sequence-wise balance loss sums its counts and lengths over the group
(`Router.sequence_sum`) and splits the same way. The executor scales gradients by cp/dp (a sum
over the cp ranks of a sequence, a mean over the dp/cp data-parallel replicas).

MTP. Depth k uses positions i < T-k: every rank keeps its rows below T-k, takes the embedding of
token i+k and the label of i+k+1 from the whole micro-batch (no exchange), and the depth's
attention gathers over those rows the same way (S = T-k keys).

Shapes: B micro-batch sequences, T this rank's rows, S positions of the whole sequence
(or of an MTP depth), X latent width, C cp ranks, D hidden.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megads.model.loss import IGNORE_INDEX
from megads.model.rope import RopeCache
from megads.model.router import Router


def zigzag_position_list(seq_len: int, *, cp: int, rank: int) -> list[int]:
    """Positions (ascending) of the rows rank `rank` of `cp` holds: chunks rank and 2cp-1-rank."""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallel: a sequence of {seq_len} tokens cannot be cut into 2*cp = {2 * cp} "
                         f"equal chunks; use a seq_len that is a multiple of {2 * cp}")
    c = seq_len // (2 * cp)
    return [*range(rank * c, (rank + 1) * c), *range((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]


def zigzag_positions(seq_len: int, *, cp: int, rank: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`zigzag_position_list` as a tensor on `device`."""
    return torch.tensor(zigzag_position_list(seq_len, cp=cp, rank=rank), dtype=torch.long, device=device)


@functools.lru_cache(maxsize=64)
def _shard_layout(seq_len: int, cp: int, limit: int) -> tuple[tuple[tuple[int, ...], ...], tuple[int, ...], int]:
    """(positions below `limit` of every rank, the gathered row of every position, rows per rank
    padded to the longest). Host bookkeeping in Python: built once per length, never read back
    from a device."""
    ranks = tuple(tuple(p for p in zigzag_position_list(seq_len, cp=cp, rank=r) if p < limit) for r in range(cp))
    rows_max = max(len(p) for p in ranks)
    index = [0] * limit
    for r, positions in enumerate(ranks):
        for i, p in enumerate(positions):
            index[p] = r * rows_max + i
    return ranks, tuple(index), rows_max


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks over the cp group; backward: each rank gets the sum of
    the gradients every rank computed for its rows (a reduce-scatter, as one all-to-all)."""

    @staticmethod
    def forward(ctx: Any, x_BTX: torch.Tensor, cp: ContextParallel) -> torch.Tensor:  # type: ignore[override]
        ctx.cp = cp
        x_BTX = x_BTX.contiguous()
        parts = [torch.empty_like(x_BTX) for _ in range(cp.size)]
        dist.all_gather(parts, x_BTX, group=cp.group)
        cp.sent_bytes += (cp.size - 1) * x_BTX.numel() * x_BTX.element_size()
        return torch.stack(parts)  # [C, B, T, X]

    @staticmethod
    def backward(ctx: Any, grad_CBTX: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        cp: ContextParallel = ctx.cp
        grad_CBTX = grad_CBTX.contiguous()
        got_CBTX = torch.empty_like(grad_CBTX)
        dist.all_to_all_single(got_CBTX, grad_CBTX, group=cp.group)  # got[r]: rank r's gradient of my rows
        cp.sent_bytes += (cp.size - 1) * grad_CBTX[0].numel() * grad_CBTX.element_size()
        return got_CBTX.sum(0), None


@dataclass
class LatentShard:
    """This rank's rows of one sequence (or of an MTP depth's first S positions): implements the
    `megads.model.rope.SequenceShard` MLA attends through."""

    cp: ContextParallel
    positions_T: torch.Tensor  # this rank's rows
    index_S: torch.Tensor  # position s -> its place in the rank-major padded gather (rank * Tmax + row)
    rows_max: int  # Tmax: the most rows any rank holds (the gather pads to it)
    row_runs: list[tuple[int, int, int]]  # see `runs`

    def gather(self, rows_BTX: torch.Tensor) -> torch.Tensor:
        B, T, X = rows_BTX.shape
        if T < self.rows_max:  # an MTP depth cuts ranks unevenly: pad to the longest
            rows_BTX = torch.cat([rows_BTX, rows_BTX.new_zeros(B, self.rows_max - T, X)], dim=1)
        all_CBTX = _GatherRows.apply(rows_BTX, self.cp)
        flat_BCX = all_CBTX.permute(1, 0, 2, 3).reshape(B, self.cp.size * self.rows_max, X)
        return flat_BCX.index_select(1, self.index_S.to(flat_BCX.device))  # [B, S, X] in position order

    def runs(self) -> list[tuple[int, int, int]]:
        """(first row, end row, end position) of each run of consecutive positions among the rows:
        the zig-zag chunks (two; an MTP depth's cut may shorten the late one)."""
        return self.row_runs


def position_runs(positions: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, end position) of each run of consecutive values of ascending `positions`."""
    out, lo = [], 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            out.append((lo, i, positions[i - 1] + 1))
            lo = i
    return out


@dataclass
class ContextParallel:
    """This rank's place in its cp group; makes the shards of its sequences and counts the bytes."""

    group: Any  # dist.ProcessGroup of the cp ranks of this sequence
    size: int
    rank: int
    sent_bytes: int = field(default=0)  # latent (and latent-gradient) bytes this rank sent

    def positions(self, seq_len: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
        return zigzag_positions(seq_len, cp=self.size, rank=self.rank, device=device)

    def shard(self, seq_len: int, *, limit: int | None = None, device: torch.device | str = "cpu") -> LatentShard:
        """The shard of positions < `limit` (default: the whole sequence) of a `seq_len` sequence."""
        ranks, index, rows_max = _shard_layout(seq_len, self.size, seq_len if limit is None else limit)
        mine = list(ranks[self.rank])
        return LatentShard(self, positions_T=torch.tensor(mine, dtype=torch.long, device=device),
                           index_S=torch.tensor(index, dtype=torch.long, device=device), rows_max=rows_max,
                           row_runs=position_runs(mine))

    def rope(self, model: nn.Module, seq_len: int, *, dtype: torch.dtype, device: torch.device,
             limit: int | None = None) -> RopeCache:
        """The rope of this rank's rows below `limit`, with their shard."""
        shard = self.shard(seq_len, limit=limit, device=device)
        return model.rotary(shard.positions_T, dtype=dtype, shard=shard)  # type: ignore[operator]

    def reset_volume(self) -> None:
        self.sent_bytes = 0


def label_count(labels_BT: torch.Tensor) -> torch.Tensor:
    """Labelled tokens of the whole micro-batch: the denominator of every rank's cross entropy."""
    return (labels_BT != IGNORE_INDEX).sum().float()


def apply_context_parallel(model: nn.Module, cp: ContextParallel) -> None:
    """Give every router the sum over the holders of a sequence (the sequence-wise balance loss)."""

    def sequence_sum(stats_BX: torch.Tensor) -> None:
        dist.all_reduce(stats_BX, group=cp.group)

    for module in model.modules():
        if isinstance(module, Router):
            module.sequence_sum = sequence_sum


def latent_values_per_token(cfg: Any) -> int:
    """Values one token's latent exchange moves: kv_lora_rank + qk_rope_head_dim."""
    return int(cfg.kv_lora_rank + cfg.qk_rope_head_dim)


def kv_values_per_token(cfg: Any) -> int:
    """Values a per-head key/value exchange would move: H * (qk_nope + qk_rope + v)."""
    return int(cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim))
