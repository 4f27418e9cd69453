"""Analytic model-state bytes of one rank: parameters, gradients, ZeRO-1 optimizer shards.

Counted from the model config's formulas (`megads.model.config.count_parameters`) and the
layout's numbers alone, without building anything: `tools/rank_memory` builds a rank for real
and checks its measured bytes against these counts, and the capacity planner sizes layouts with
them. What a rank holds (see `megads.parallel.stages.build_stage_model` and
`megads.parallel.zero1`):

    parameters  its pipeline pieces' layers (routed experts: E/ep of each MoE layer), the
                embedding where piece 0 lives, the final norm, head and MTP modules where the
                last piece lives, and there also an embedding copy for MTP when piece 0 lives
                on another pipeline rank; all float32 (bf16 runs autocast)
    gradients   one float32 .grad per parameter
    ZeRO-1      per space (dense over dp, expert over edp = dp/ep, tied = the embedding copies,
                over dp): this rank's 1/g of every bucket of FP32 master weights, two moments
                (parallel.moments_dtype) and the FP32 reduced-gradient shard

Only the ZeRO-1 shards are not an exact formula of the config: buckets are padded to a multiple
of the group size g, so a rank owns (numel + padding) / g elements of a space; the padding
depends on how the parameters fall into buckets and is read from the optimizer (and named) by
the tool. With float32 moments the fused AdamW adds a 16-element tail per space where the shard
is not a multiple of 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megads.model.config import ModelConfig, count_parameters

FP32 = 4


@dataclass(frozen=True)
class RankParams:
    """Parameter counts of one rank by ZeRO-1 space kind."""

    dense: int  # replicated over the stage's dp group
    expert: int  # this ep rank's routed experts, replicated over edp
    tied: int  # the embedding when piece 0 and the last piece live on different pipeline ranks

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.tied


def rank_parameters(
    cfg: ModelConfig, *, layers: Sequence[int], first: bool, last: bool, ep: int, embedding_tied: bool
) -> RankParams:
    """Parameters of a rank holding transformer `layers`, piece 0 (`first`) and/or the last piece.

    `embedding_tied`: piece 0 and the last piece are on different pipeline ranks, so both hold
    the embedding in the tied space (the last one for MTP).
    """
    counts = count_parameters(cfg)
    h, E = cfg.hidden_size, cfg.n_routed_experts
    expert = 3 * h * cfg.moe_intermediate_size  # one routed expert: gate, up, down
    dense = routed = 0
    for i in layers:
        n = counts.per_layer[i]
        if cfg.is_moe_layer(i):
            n -= E * expert
            routed += (E // ep) * expert
        dense += n
    holds_embedding = first or (last and cfg.num_nextn_predict_layers > 0)
    if last:
        head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
        dense += h + head  # final norm, output head
        mtp_moe = cfg.is_moe_layer(cfg.num_hidden_layers)
        per_depth_routed = E * expert if mtp_moe else 0
        dense += counts.mtp - cfg.num_nextn_predict_layers * per_depth_routed
        routed += cfg.num_nextn_predict_layers * (per_depth_routed // ep)
    embedding = counts.embedding if holds_embedding else 0
    if embedding_tied:
        return RankParams(dense=dense, expert=routed, tied=embedding)
    return RankParams(dense=dense + embedding, expert=routed, tied=0)


@dataclass(frozen=True)
class Zero1Bytes:
    """One space's ZeRO-1 bytes on this rank for a given bucket padding."""

    numel: int  # parameters in the space (all ranks of its group hold the same ones)
    group_size: int  # g: dp for dense/tied, edp for expert (1 when not sharded)
    padding: int  # elements added to make every bucket a multiple of g (summed over buckets)
    moments_bytes: int  # bytes per moment element (4 float32, 2 bfloat16)

    @property
    def owned(self) -> int:
        assert (self.numel + self.padding) % self.group_size == 0, "padding must round every bucket to g"
        return (self.numel + self.padding) // self.group_size

    @property
    def master(self) -> int:
        return self.owned * FP32

    @property
    def moments(self) -> int:
        return 2 * self.owned * self.moments_bytes

    @property
    def grad_shard(self) -> int:
        return self.owned * FP32

    @property
    def total(self) -> int:
        return self.master + self.moments + self.grad_shard
