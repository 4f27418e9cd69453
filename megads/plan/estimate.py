"""Memory, step time and cost of one layout on one cluster, from numbers alone.

Per pipeline piece (`megads.parallel.stages.piece_specs`) the planner sums, per micro-batch:

- compute: forward FLOPs by kind (dense linears, routed-expert grouped GEMMs, BF16 GEMMs kept
  in higher precision: router, output head; attention core) divided by the peak of the kind's
  precision times its achieved efficiency (`EfficiencyConfig`), plus memory-bound kernels at HBM
  bandwidth (`elementwise_passes` x the saved activation bytes). Backward: input gradient = the
  forward GEMMs (+ 2.5x the attention core), weight gradient = the forward GEMMs, plus the
  recomputed forward of `recompute`.
- expert all-to-all: bytes from tokens x top-k x hidden (dispatch 1 byte + scales under FP8,
  combine and every backward transfer in BF16), inter-node part from node-limited routing (a
  token crosses the network once per remote node it reaches, at most
  `LayoutPlan.max_nodes_per_token`), the rest over NVLink; time = the slower of the two links.
- these per-piece costs drive the schedule simulator (`megads.pipeline.simulate`, with
  `PieceCosts`): an overlapped F&B pair costs max(compute of both chunks on the SMs left by the
  communication kernels, their all-to-alls); any other action pays its all-to-alls exposed.
  megads' W pass re-walks the expert all-to-all backward, so a split W pays it again.
- after the pipeline: ZeRO-1 reduce-scatter + all-gather (ring, over the network when the group
  spans nodes) less `dp_overlap`, and the AdamW update at HBM bandwidth.

Memory per pipeline rank: parameters, gradients and ZeRO-1 shards of `megads.parallel.memory`
(bucket padding taken as 0), activations at the schedule's peak (the per-piece bytes of
`megads.plan.activations` replayed over the rank's action order: a (chunk, micro-batch) is live
from its F to its W), the all-to-all buffers of one micro-batch in flight, and the ZeRO-1 FP32
buckets of the exchange (up to one FP32 copy of the rank's gradients; the exchange runs after
the backward, so the peak is the larger of the two phases).

Shapes: n tokens of one micro-batch on one rank, D hidden, K top-k.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from megads.model.config import ModelConfig, count_parameters
from megads.parallel.memory import FP32, RankParams, Zero1Bytes, rank_parameters
from megads.parallel.mesh import LayoutPlan, plan_layout
from megads.parallel.stages import PieceSpec, piece_specs, rank_pieces
from megads.pipeline.actions import Action, Costs, Op
from megads.pipeline.schedules import build_schedule, get_schedule, validate_microbatches
from megads.pipeline.validate import simulate
from megads.plan.activations import Elems, embedding_elems, head_elems, layer_elems, mtp_elems
from megads.plan.config import ClusterConfig, EfficiencyConfig, PlanConfig

GB = 1e9


@dataclass(frozen=True)
class Candidate:
    """One layout the planner evaluates (`parallel.cp` included)."""

    pp: int
    ep: int
    schedule: str
    micro_batch_size: int
    recompute: str
    cp: int = 1
    stage_layers: tuple[int, ...] | None = None

    def label(self) -> str:
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return f"pp{self.pp} ep{self.ep}{cp} {self.schedule} mbs{self.micro_batch_size} {self.recompute}"


@dataclass
class Work:
    """Forward work of one piece for one micro-batch (FLOPs by kind, bytes)."""

    flops: dict[str, float] = field(default_factory=lambda: {"dense": 0.0, "grouped": 0.0, "bf16": 0.0, "attention": 0.0})
    recompute_flops: dict[str, float] = field(default_factory=lambda: {"dense": 0.0, "grouped": 0.0, "bf16": 0.0, "attention": 0.0})
    act_bytes: float = 0.0  # saved for backward
    a2a_fwd_s: float = 0.0  # dispatch + combine of every MoE layer
    a2a_bwd_s: float = 0.0
    moe_layers: int = 0
    # context parallel: the MLA latent all-gathers (forward; again in the backward under
    # recomputation) and the latent-gradient exchanges (backward), exposed (not overlapped)
    cp_fwd_s: float = 0.0
    cp_bwd_s: float = 0.0
    cp_bytes: float = 0.0  # latent bytes this rank sends for one micro-batch, forward + backward
    cp_transient_bytes: float = 0.0  # one layer's recomputed keys and values of the S gathered positions


@dataclass
class PieceTime:
    F: float
    B: float
    W: float
    a2a_F: float
    a2a_B: float


@dataclass
class MemoryBreakdown:
    """Bytes of the worst pipeline rank (and which one)."""

    pp_rank: int
    params: float
    grads: float
    optimizer: float
    activations: float
    a2a_buffers: float
    zero1_buckets: float
    total: float
    hbm: float
    usable: float
    rank_params: RankParams | None = None
    activation_parts: dict[str, float] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


@dataclass
class TimeBreakdown:
    step_s: float
    pipeline_s: float  # simulated makespan
    compute_s: float  # compute of the busiest rank
    slowdown_s: float  # its compute slowed by the SMs the overlapped communication holds
    bubble_s: float
    a2a_total_s: float  # every all-to-all of the slowest rank, hidden or not
    a2a_exposed_s: float
    dp_s: float  # ZeRO-1 reduce-scatter + all-gather exposed
    optimizer_s: float
    microbatches: int


@dataclass
class Estimate:
    candidate: Candidate
    plan: LayoutPlan
    memory: MemoryBreakdown
    time: TimeBreakdown
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    mfu_bf16: float  # model FLOPs / BF16 dense peak
    mfu_precision: float  # against the peak of the run's GEMM precision
    gpu_hours: float  # per PlanConfig.tokens
    days: float  # wall-clock days for PlanConfig.tokens on the whole cluster
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        c, m, t = self.candidate, self.memory, self.time
        return {
            "layout": c.label(), "pp": c.pp, "ep": c.ep, "cp": c.cp, "dp": self.plan.dp, "schedule": c.schedule,
            "micro_batch_size": c.micro_batch_size, "recompute": c.recompute,
            "stage_layers": list(self.plan.stage_layers),
            "memory_gb": {k: getattr(m, k) / GB for k in ("params", "grads", "optimizer", "activations", "a2a_buffers",
                                                          "zero1_buckets", "total", "usable")},
            "fits": m.fits, "worst_rank": m.pp_rank,
            "time_s": dataclasses.asdict(t), "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
            "model_tflops_per_gpu": self.model_tflops_per_gpu, "mfu_bf16": self.mfu_bf16,
            "mfu_precision": self.mfu_precision, "gpu_hours": self.gpu_hours, "days": self.days, "notes": self.notes,
        }


# ------------------------------------------------------------------------------------ FLOPs


def layer_flops(cfg: ModelConfig, layer: int, *, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token of one layer by kind (attention core causal: (T+1)/2 keys)."""
    D, H, Q, V = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank is None:
        q = D * H * Q
    else:
        q = D * cfg.q_lora_rank + cfg.q_lora_rank * H * Q
    kv = D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + V)
    out = {"dense": 2.0 * (q + kv + H * V * D), "grouped": 0.0, "bf16": 0.0,
           "attention": 2.0 * H * (Q + V) * (seq_len + 1) / 2}
    if cfg.is_moe_layer(layer):
        out["bf16"] += 2.0 * D * cfg.n_routed_experts  # router, kept in higher precision
        out["dense"] += 2.0 * 3 * D * cfg.moe_intermediate_size * cfg.n_shared_experts
        out["grouped"] += 2.0 * 3 * D * cfg.moe_intermediate_size * cfg.num_experts_per_tok
    else:
        out["dense"] += 2.0 * 3 * D * cfg.intermediate_size
    return out


def _recomputed_flops(cfg: ModelConfig, layer: int, fl: dict[str, float], recompute: str) -> dict[str, float]:
    """Forward FLOPs the backward runs again under `recompute` (megads.model.recompute)."""
    if recompute == "none":
        return {k: 0.0 for k in fl}
    if recompute == "full" and not cfg.is_moe_layer(layer):
        return dict(fl)
    # selective (and full for MoE blocks): attention (projections + core), every SwiGLU
    out = {k: 0.0 for k in fl}
    out["attention"] = fl["attention"]
    out["dense"] = fl["dense"]  # attention projections + dense MLP / shared experts
    out["grouped"] = fl["grouped"]
    return out


def model_flops_per_token(cfg: ModelConfig, *, seq_len: int) -> float:
    """Training FLOPs per token (forward x 3, no recomputation): layers, head, MTP."""
    total = 0.0
    for i in range(cfg.num_hidden_layers):
        total += sum(layer_flops(cfg, i, seq_len=seq_len).values())
    total += 2.0 * cfg.hidden_size * cfg.vocab_size
    for _ in range(cfg.num_nextn_predict_layers):
        total += 2.0 * 2 * cfg.hidden_size * cfg.hidden_size + 2.0 * cfg.hidden_size * cfg.vocab_size
        total += sum(layer_flops(cfg, cfg.num_hidden_layers, seq_len=seq_len).values())
    return 3.0 * total


# ------------------------------------------------------------------------------ all-to-all


def a2a_seconds(cfg: ModelConfig, plan: LayoutPlan, cluster: ClusterConfig, eff: EfficiencyConfig, *,
                tokens: int, bytes_per_value: float) -> float:
    """One all-to-all (dispatch or combine) of `tokens` tokens' top-k rows of one MoE layer."""
    if plan.ep == 1:
        return 0.0
    D, K = cfg.hidden_size, cfg.num_experts_per_tok
    row = D * bytes_per_value
    nodes = plan.nodes_per_ep_group
    rpn = min(plan.ep, plan.ranks_per_node)
    if nodes == 1:
        intra = tokens * K * row * (1 - 1 / plan.ep)
        inter = 0.0
    else:
        m = min(plan.max_nodes_per_token, K, nodes)
        inter = tokens * m * (1 - 1 / nodes) * row  # one copy per remote node (forwarded inside it)
        intra = tokens * K * row * (1 - 1 / rpn)
    t_intra = intra / (cluster.nvlink_gbps * GB * eff.nvlink)
    t_inter = inter / (cluster.internode_gbps * GB * eff.internode)
    return max(t_intra, t_inter) + cluster.collective_latency_us * 1e-6


def cp_exchange_seconds(plan_cp: int, cluster: ClusterConfig, eff: EfficiencyConfig, *, nbytes: float) -> float:
    """One latent all-gather (or its gradient's exchange) over the cp group, `nbytes` sent by each
    rank in all. The cp ranks of a sequence are consecutive ranks of a stage: one node when cp
    fits in it, else the network."""
    if plan_cp == 1:
        return 0.0
    link = cluster.nvlink_gbps * GB * eff.nvlink if plan_cp <= cluster.gpus_per_node \
        else cluster.internode_gbps * GB * eff.internode
    return nbytes / link + cluster.collective_latency_us * 1e-6


# ------------------------------------------------------------------------------------- work


def piece_work(cfg: ModelConfig, spec: PieceSpec, plan: LayoutPlan, pc: PlanConfig, cand: Candidate) -> Work:
    """Forward work and saved bytes of piece `spec` for one micro-batch."""
    T = pc.seq_len // cand.cp
    n = cand.micro_batch_size * T
    chunked = pc.loss_chunk_tokens > 0
    w = Work()
    elems: list[tuple[Elems, int]] = []

    def add(fl: dict[str, float], tokens: float, rec: dict[str, float] | None = None) -> None:
        for k, v in fl.items():
            w.flops[k] += v * tokens
        for k, v in (rec or {}).items():
            w.recompute_flops[k] += v * tokens

    disp = 1.0 + 4.0 / 128 if pc.precision == "fp8" else (4.0 if pc.precision == "fp32" else 2.0)
    comb = 4.0 if pc.precision == "fp32" else 2.0

    cp = cand.cp
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # values a token's cp exchange moves
    kv_up = 2.0 * cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    act_bytes = 4.0 if pc.precision == "fp32" else 2.0

    def cp_attention(fl: dict[str, float], tokens: int) -> dict[str, float]:
        """Under cp every rank up-projects the keys and values of all S = cp x its rows (the extra
        (cp - 1) x kv_b_proj per own token, in F, B and W) and recomputes that up-projection in the
        backward (checkpointed); its latent rows go to the cp - 1 peers forward and their
        gradients come back backward (again forward under recomputation). Returns the extra
        recomputed FLOPs per token."""
        if cp == 1:
            return {}
        fl["dense"] += (cp - 1) * kv_up
        sent = (cp - 1) * tokens * latent * act_bytes
        gathers_fwd, gathers_bwd = 1, 1 + (cand.recompute != "none")
        w.cp_bytes += (gathers_fwd + gathers_bwd) * sent
        w.cp_fwd_s += gathers_fwd * cp_exchange_seconds(cp, pc.cluster, pc.efficiency, nbytes=sent)
        w.cp_bwd_s += gathers_bwd * cp_exchange_seconds(cp, pc.cluster, pc.efficiency, nbytes=sent)
        heads = cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        w.cp_transient_bytes = max(w.cp_transient_bytes, cp * tokens * heads * act_bytes)
        return {"dense": cp * kv_up}

    def moe_comm(tokens: int) -> None:
        w.moe_layers += 1
        w.a2a_fwd_s += a2a_seconds(cfg, plan, pc.cluster, pc.efficiency, tokens=tokens, bytes_per_value=disp)
        w.a2a_fwd_s += a2a_seconds(cfg, plan, pc.cluster, pc.efficiency, tokens=tokens, bytes_per_value=comb)
        w.a2a_bwd_s += 2 * a2a_seconds(cfg, plan, pc.cluster, pc.efficiency, tokens=tokens, bytes_per_value=comb)

    if spec.first:
        elems.append((embedding_elems(), n))
    for i in spec.layers:
        fl = layer_flops(cfg, i, seq_len=pc.seq_len)
        cp_rec = cp_attention(fl, n)
        add(fl, n, _recomputed_flops(cfg, i, fl, cand.recompute))
        add({}, n, cp_rec)
        elems.append((layer_elems(cfg, i, seq_len=T, recompute=cand.recompute, cp=cp), n))
        if cfg.is_moe_layer(i):
            moe_comm(n)
    if spec.last:
        D = cfg.hidden_size
        add({"bf16": 2.0 * D * cfg.vocab_size}, n)
        elems.append((head_elems(cfg, chunked_loss=chunked), n))
        for k in range(1, cfg.num_nextn_predict_layers + 1):
            nk = cand.micro_batch_size * max(T - k, 0)
            j = cfg.num_hidden_layers + k - 1
            fl = layer_flops(cfg, j, seq_len=pc.seq_len)
            cp_rec = cp_attention(fl, nk)
            add(fl, nk, _recomputed_flops(cfg, j, fl, cand.recompute))
            add({"dense": 2.0 * 2 * D * D, "bf16": 2.0 * D * cfg.vocab_size}, nk, cp_rec)
            elems.append((mtp_elems(cfg, seq_len=T - k, recompute=cand.recompute, chunked_loss=chunked, cp=cp), nk))
            if cfg.is_moe_layer(j):
                moe_comm(nk)
    w.act_bytes = sum(e.nbytes(tokens=t, precision=pc.precision) for e, t in elems)
    return w


def _rate(kind: str, pc: PlanConfig) -> float:
    """Achieved FLOP/s of a kind of work under the run's precision."""
    c, e = pc.cluster, pc.efficiency
    bf16 = c.peak_tflops_bf16 * 1e12
    if pc.precision == "fp32":
        bf16 = bf16 / 2  # TF32 tensor cores: half the BF16 rate
    if kind == "attention":
        return bf16 * e.attention
    if kind == "bf16":
        return bf16 * e.gemm_bf16
    if pc.precision == "fp8":
        fp8 = c.peak_tflops_fp8 * 1e12
        return fp8 * (e.gemm_fp8 if kind == "dense" else e.grouped_fp8)
    return bf16 * (e.gemm_bf16 if kind == "dense" else e.grouped_bf16)


def piece_time(w: Work, pc: PlanConfig) -> PieceTime:
    """Compute seconds of F, B (input gradient) and W (weight gradient) of one chunk, all-to-alls apart."""
    hbm = pc.cluster.hbm_tbps * 1e12 * pc.efficiency.hbm
    elem_f = pc.efficiency.elementwise_passes * w.act_bytes / hbm
    gemm = {k: v / _rate(k, pc) for k, v in w.flops.items() if k != "attention"}
    attn = w.flops["attention"] / _rate("attention", pc)
    rec = sum(v / _rate(k, pc) for k, v in w.recompute_flops.items())
    F = sum(gemm.values()) + attn + elem_f + w.cp_fwd_s
    B = sum(gemm.values()) + 2.5 * attn + 2 * elem_f + rec + w.cp_bwd_s
    W = sum(gemm.values())
    return PieceTime(F=F, B=B, W=W, a2a_F=w.a2a_fwd_s, a2a_B=w.a2a_bwd_s)


@dataclass(frozen=True)
class PieceCosts(Costs):
    """Per-chunk durations for `megads.pipeline.simulate`: compute plus exposed all-to-alls, and
    overlapped F&B pairs at max(compute on the SMs the communication leaves, communication)."""

    chunk_piece: tuple[int, ...] = ()
    times: tuple[PieceTime, ...] = ()
    overlap_fb: bool = False
    compute_slowdown: float = 1.0  # sm_count / (sm_count - comm_sms) while communication runs

    def split(self, action: Action) -> tuple[float, float, float, float]:
        """(compute, slowdown from the SMs the communication holds, exposed all-to-all, all
        all-to-all) of one action; its duration is the sum of the first three."""
        t = self.times[self.chunk_piece[action.chunk]]
        if action.op is Op.F:
            return t.F, 0.0, t.a2a_F, t.a2a_F
        if action.op is Op.B:
            return t.B, 0.0, t.a2a_B, t.a2a_B
        if action.op is Op.W:
            return t.W, 0.0, t.a2a_B, t.a2a_B  # megads' W re-walks the all-to-all backward
        if action.op is Op.BW:
            return t.B + t.W, 0.0, t.a2a_B, t.a2a_B
        assert action.op is Op.FB and action.chunk2 is not None
        b = self.times[self.chunk_piece[action.chunk2]]
        compute = t.F + b.B + b.W
        comm = t.a2a_F + b.a2a_B
        if not self.overlap_fb:
            return compute, 0.0, comm, comm
        slowed = compute * (self.compute_slowdown if comm > 0 else 1.0)
        return compute, slowed - compute, max(0.0, comm - slowed), comm

    def duration(self, action: Action) -> float:
        c, s, a, _ = self.split(action)
        return c + s + a


# ------------------------------------------------------------------------------ the estimate


def microbatches(pc: PlanConfig, plan: LayoutPlan, cand: Candidate) -> int:
    """Micro-batches per data-parallel replica; ValueError when the batch does not split."""
    replicas = plan.dp // cand.cp
    per = replicas * cand.micro_batch_size
    if pc.global_batch % per:
        raise ValueError(f"global_batch={pc.global_batch} is not a multiple of data-parallel replicas {replicas} "
                         f"x micro_batch_size {cand.micro_batch_size}")
    m = pc.global_batch // per
    validate_microbatches(cand.schedule, pp=cand.pp, num_microbatches=m) if cand.pp > 1 else None
    return m


def layout_plan(pc: PlanConfig, cand: Candidate) -> LayoutPlan:
    """`plan_layout` for the candidate on the cluster (cp ranks come out of the data-parallel size)."""
    cfg = pc.model
    _check_cp(pc, cand)
    spec = get_schedule(cand.schedule) if cand.pp > 1 else None
    return plan_layout(
        world_size=pc.cluster.world_size, pp=cand.pp, ep=cand.ep, cp=cand.cp, num_layers=cfg.num_hidden_layers,
        n_routed_experts=cfg.n_routed_experts, stage_layers=list(cand.stage_layers) if cand.stage_layers else None,
        pieces_per_rank=spec.pieces_per_rank if spec else 1, ranks_per_node=pc.cluster.gpus_per_node,
        n_group=cfg.n_group, topk_group=cfg.topk_group, node_limit=pc.parallel.node_limit,
    )


def _schedule(cand: Candidate, m: int) -> Any:
    name = cand.schedule if cand.pp > 1 else "1f1b"
    return build_schedule(name, pp=cand.pp, num_microbatches=m)


def _check_cp(pc: PlanConfig, cand: Candidate) -> None:
    if cand.cp > 1 and pc.seq_len % (2 * cand.cp):
        raise ValueError(f"seq_len={pc.seq_len} with parallel.cp={cand.cp}: context parallel cuts a sequence into "
                         f"2*cp = {2 * cand.cp} chunks; make seq_len a multiple of {2 * cand.cp}")


def rank_activation_peak(schedule: Any, *, rank: int, piece_bytes: list[float]) -> float:
    """Largest sum of live chunk activations over `rank`'s action order (F adds, W / BW frees)."""
    layout = schedule.layout
    live = peak = 0.0
    for a in schedule.actions[rank]:
        if not a.op.is_compute:
            continue
        for part in a.parts:
            b = piece_bytes[layout.chunks[part.chunk].piece]
            if part.op is Op.F:
                live += b
                peak = max(peak, live)
            elif part.op in (Op.W, Op.BW):
                live -= b
    return peak


def rank_model_state(pc: PlanConfig, plan: LayoutPlan, layout: Any, *, rank: int) -> tuple[RankParams, list[Zero1Bytes]]:
    """Parameters of pipeline rank `rank` and its ZeRO-1 spaces (dense, expert, tied).

    Bucket padding: one round-up of each space to a multiple of its group size, which is
    megads' padding whenever a space fits one bucket or every bucket is a multiple of g (the
    671B recipe: buckets of multiples of 128 elements); otherwise megads pads each bucket and
    the count is low by less than g elements per bucket.
    """
    specs = piece_specs(plan.stage_layers)
    mine = [specs[i] for i in rank_pieces(layout, rank=rank)]
    tied = set(layout.piece_ranks(0)) != set(layout.piece_ranks(layout.num_pieces - 1))
    rp = rank_parameters(pc.model, layers=[i for s in mine for i in s.layers], first=any(s.first for s in mine),
                         last=any(s.last for s in mine), ep=plan.ep, embedding_tied=tied)
    moments = 2 if pc.parallel.moments_dtype == "bfloat16" else 4
    g = plan.dp if pc.parallel.zero1 else 1
    ge = plan.edp if pc.parallel.zero1 else 1
    z = [Zero1Bytes(numel=n, group_size=gg, padding=(-n) % gg, moments_bytes=moments)
         for n, gg in ((rp.dense, g), (rp.expert, ge), (rp.tied, g))]
    return rp, z


def estimate(pc: PlanConfig, cand: Candidate, *, plan: LayoutPlan | None = None) -> Estimate:
    """Memory, time and cost of `cand` (ValueError when the layout is invalid)."""
    cfg, cl, eff = pc.model, pc.cluster, pc.efficiency
    plan = plan or layout_plan(pc, cand)
    m = microbatches(pc, plan, cand)
    sched = _schedule(cand, m)
    layout = sched.layout
    specs = piece_specs(plan.stage_layers)
    works = [piece_work(cfg, s, plan, pc, cand) for s in specs]
    times = [piece_time(w, pc) for w in works]
    spec = get_schedule(sched.name)
    overlap = spec.has_fb_pairs and pc.parallel.overlap_fb
    slow = cl.sm_count / max(cl.sm_count - eff.comm_sms, 1) if overlap else 1.0
    costs = PieceCosts(chunk_piece=tuple(c.piece for c in layout.chunks), times=tuple(times),
                       overlap_fb=overlap, compute_slowdown=slow)
    sim = simulate(sched, costs=costs, strict=False)
    replicas = max(len(layout.piece_ranks(p)) for p in range(layout.num_pieces))
    moments = 2 if pc.parallel.moments_dtype == "bfloat16" else 4
    worst: MemoryBreakdown | None = None
    dp_s = opt_s = 0.0
    usable = cl.hbm_gb * GB * (1 - pc.memory_margin)
    for r in range(cand.pp):
        mine_idx = rank_pieces(layout, rank=r)
        mine = [specs[i] for i in mine_idx]
        rp, z = rank_model_state(pc, plan, layout, rank=r)
        g = plan.dp if pc.parallel.zero1 else 1
        ge = plan.edp if pc.parallel.zero1 else 1
        opt = float(sum(zz.total for zz in z))
        params = float(rp.total * FP32)
        acts = rank_activation_peak(sched, rank=r, piece_bytes=[w.act_bytes for w in works])
        n = cand.micro_batch_size * pc.seq_len // cand.cp
        a2a_buf = 0.0
        if any(cfg.is_moe_layer(i) for s in mine for i in s.layers) and plan.ep > 1:
            a2a_buf = 2.0 * n * cfg.num_experts_per_tok * cfg.hidden_size * (2 if pc.precision != "fp32" else 4)
        # under cp, one layer's backward holds the recomputed keys and values of all S positions
        a2a_buf += max((works[i].cp_transient_bytes for i in mine_idx), default=0.0)
        buckets = params if plan.dp > 1 else 0.0
        total = 2 * params + opt + max(acts + a2a_buf, buckets)
        mb = MemoryBreakdown(pp_rank=r, params=params, grads=params, optimizer=opt, activations=acts,
                             a2a_buffers=a2a_buf, zero1_buckets=buckets, total=total, hbm=cl.hbm_gb * GB,
                             usable=usable, rank_params=rp)
        if worst is None or mb.total > worst.total:
            worst = mb
        # ZeRO-1 exchange: reduce-scatter FP32 gradients + all-gather FP32 parameters, ring
        # a stage's dp group (and its edp groups) are dp consecutive ranks: across nodes iff dp > a node
        link = cl.internode_gbps * GB * eff.internode if plan.dp > cl.gpus_per_node else cl.nvlink_gbps * GB * eff.nvlink
        t = 0.0
        for numel, grp in ((rp.dense + rp.tied, g), (rp.expert, ge)):
            if grp > 1:
                t += 2 * (grp - 1) / grp * numel * FP32 / link + 2 * cl.collective_latency_us * 1e-6
        owned = sum(zz.owned for zz in z)
        opt_t = owned * (3 * 4 + 4 * moments) / (cl.hbm_tbps * 1e12 * eff.hbm)
        dp_s, opt_s = max(dp_s, t * (1 - eff.dp_overlap)), max(opt_s, opt_t)
    assert worst is not None
    slowest = max(range(cand.pp), key=lambda r: sim.busy[r])
    parts = [costs.split(a.action) for a in sim.timeline if a.rank == slowest]
    comp_only, slowdown, exposed, a2a_total = (sum(p[i] for p in parts) for i in range(4))
    step = sim.makespan + dp_s + opt_s
    tb = TimeBreakdown(step_s=step, pipeline_s=sim.makespan, compute_s=comp_only, slowdown_s=slowdown,
                       bubble_s=sim.makespan - sim.busy[slowest], a2a_total_s=a2a_total,
                       a2a_exposed_s=exposed, dp_s=dp_s, optimizer_s=opt_s,
                       microbatches=m)
    tokens_step = pc.global_batch * pc.seq_len
    tps = tokens_step / step / cl.world_size
    flops_tok = model_flops_per_token(cfg, seq_len=pc.seq_len)
    tflops = flops_tok * tps / 1e12
    peak_prec = cl.peak_tflops_fp8 if pc.precision == "fp8" else cl.peak_tflops_bf16
    gpu_hours = pc.tokens / tps / 3600
    notes = []
    if cand.cp > 1:
        notes.append(f"context parallel {cand.cp}: the MLA latent exchanges are exposed (not overlapped), "
                     f"{sum(w.cp_bytes for w in works) / 1e6:.1f} MB sent per rank per micro-batch over its pieces")
    if pc.precision == "fp8":
        notes.append("FP8 is modelled analytically (GEMM peak, 1-byte dispatch, 1-byte GEMM inputs); the trainer's "
                     "precision=fp8 runs it (docs/fp8.md: the torch block-scaled backend on Hopper GPUs, the emulation elsewhere)")
    if replicas > 1:
        notes.append("DualPipe holds two replicas of its pieces per rank (parameters counted once per piece held)")
    est = Estimate(candidate=cand, plan=plan, memory=worst, time=tb, tokens_per_s_per_gpu=tps,
                   model_tflops_per_gpu=tflops, mfu_bf16=tflops / cl.peak_tflops_bf16,
                   mfu_precision=tflops / peak_prec, gpu_hours=gpu_hours,
                   days=pc.tokens / (tps * cl.world_size) / 86400, notes=notes)
    est.memory.activation_parts = {f"per micro-batch, piece {i}": w.act_bytes / GB for i, w in enumerate(works)}
    return est


def layer_cost_units(pc: PlanConfig, cand: Candidate, plan: LayoutPlan) -> list[float]:
    """Per-piece forward+backward seconds of the plan's pieces (what stage balancing equalises)."""
    works = [piece_work(pc.model, s, plan, pc, cand) for s in piece_specs(plan.stage_layers)]
    out = []
    for w in works:
        t = piece_time(w, pc)
        out.append(t.F + t.B + t.W + t.a2a_F + t.a2a_B)
    return out


def balance_stage_layers(pc: PlanConfig, cand: Candidate) -> tuple[int, ...]:
    """Layer counts per piece that minimise the busiest pipeline rank's work (boundary moves of one
    layer at a time from the balanced default, each piece keeping at least one layer)."""
    base = layout_plan(pc, dataclasses.replace(cand, stage_layers=None))
    counts = list(base.stage_layers)
    sched = _schedule(cand, max(get_schedule(cand.schedule).min_microbatches(cand.pp), 2 * cand.pp) if cand.pp > 1 else 1)
    layout = sched.layout
    owners = [layout.piece_ranks(p) for p in range(layout.num_pieces)]

    def worst(cs: list[int]) -> tuple[float, float]:
        plan = dataclasses.replace(base, stage_layers=tuple(cs))
        cost = layer_cost_units(pc, cand, plan)
        load = [0.0] * cand.pp
        for p, c in enumerate(cost):
            for r in owners[p]:
                load[r] += c
        return max(load), sum(x * x for x in load)

    best = worst(counts)
    improved = True
    while improved:
        improved = False
        for i in range(len(counts) - 1):
            for d in (1, -1):
                cs = list(counts)
                cs[i] += d
                cs[i + 1] -= d
                if min(cs) < 1:
                    continue
                w = worst(cs)
                if w < best:
                    best, counts, improved = w, cs, True
    return tuple(counts)


def model_param_count(cfg: ModelConfig) -> int:
    c = count_parameters(cfg)
    return c.total + c.mtp
