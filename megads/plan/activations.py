"""Bytes of the activations one micro-batch leaves saved for backward, per layer type.

The count follows what autograd saves in `megads.model` op by op (the CPU measurement of
`megads.testing.activations.SavedTensorTracker` is the reference, tests/test_planner.py), in
elements per token of three classes whose byte width depends on the precision:

    f32   always float32: RMSNorm's float32 input copy, its normalised value and rsqrt, router
          scores, gate weights, the float32 log-softmax of the loss
    act   the compute dtype (float32 on CPU, bfloat16 under autocast): attention core inputs and
          output, SwiGLU insides
    gemm  inputs of the GEMMs kept for their weight gradients: the compute dtype, or 1 byte under
          FP8 (DeepSeek-V3 caches GEMM inputs in FP8; analytic only: megads has no FP8 path yet)
    i64   int64 indices (routing, token ids)

Per layer (N tokens of one micro-batch, hidden D, H heads, nope P, rope R, qk Q = P + R, v V,
query / kv LoRA ranks Cq / Ckv, dense width Id, expert width I, top-k K, experts E):

    norm (+ the GEMM input it feeds)   f32 2D + 1, gemm D
    MLA                                 norms of c_q and c_kv, the [c_kv; k_rope] output, per-head
                                        q, k, v (padded to Q) and the attention output (4 H Q),
                                        logsumexp H, the o_proj input H V
    dense SwiGLU                        gate, silu(gate), up, product: 4 Id
    MoE                                 router scores E (f32), top-k ids and gates, the sort order
                                        (i64 2K), dispatched rows K D, expert insides 4 K I, the
                                        combine buffers 2 K D, shared experts 4 I n_shared

`recompute` (megads.model.recompute) removes what a recomputed piece keeps inside: selective
drops the MLA insides and the SwiGLU insides, full also the block's norms (a dense block keeps
only its input). Embedding: the token ids. Head: final norm and the float32 log-softmax [N, V]
(none with the chunked loss). MTP depth k: its two input norms, the [emb; h] concat, one block,
its norm and its own log-softmax, on T - k positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megads.model.config import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp8")


@dataclass
class Elems:
    """Elements per token by byte class, plus per-micro-batch extras (rotary tables)."""

    f32: float = 0.0
    act: float = 0.0
    gemm: float = 0.0
    i64: float = 0.0
    per_microbatch_act: float = 0.0  # elements independent of the token count (cos/sin tables)
    parts: dict[str, float] = field(default_factory=dict)  # label -> elements per token (all classes)

    def add(self, label: str, *, f32: float = 0.0, act: float = 0.0, gemm: float = 0.0, i64: float = 0.0) -> None:
        self.f32 += f32
        self.act += act
        self.gemm += gemm
        self.i64 += i64
        self.parts[label] = self.parts.get(label, 0.0) + f32 + act + gemm + i64

    def nbytes(self, *, tokens: int, precision: str) -> float:
        """Bytes for a micro-batch of `tokens` tokens under `precision` (fp32 | bf16 | fp8)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}")
        act = 4 if precision == "fp32" else 2
        gemm = {"fp32": 4, "bf16": 2, "fp8": 1}[precision]
        per_token = 4 * self.f32 + act * self.act + gemm * self.gemm + 8 * self.i64
        return tokens * per_token + act * self.per_microbatch_act


def _norm(e: Elems, label: str, dim: int, *, keep: bool = True) -> None:
    """RMSNorm then a GEMM reading its output: x and x*rsqrt (f32), rsqrt, the output (gemm)."""
    if keep:
        e.add(label, f32=2 * dim + 1, gemm=dim)


def attention_elems(cfg: ModelConfig, e: Elems, *, seq_len: int, recompute: str, cp: int = 1) -> None:
    """MLA's saved tensors (its input norm included). Under context parallel (cp > 1) the attention
    over the gathered positions is checkpointed (`MLA.forward`): it keeps its inputs, the queries
    of the own rows and the gathered latent of all S = cp x own rows, and none of its insides."""
    H, Q, V = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    _norm(e, "attention norm", cfg.hidden_size, keep=recompute != "full")
    if recompute != "none":
        return  # selective / full: MLA keeps only its input (the norm output above)
    if cfg.q_lora_rank is not None:
        e.add("q latent norm", f32=2 * cfg.q_lora_rank + 1, gemm=cfg.q_lora_rank)
    ckv, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if cp > 1:
        e.add("cp gathered latent", act=cp * (ckv + R))
        e.add("cp attention queries", act=H * Q)
        e.add("o_proj input", gemm=H * V)
        e.per_microbatch_act += 2 * seq_len * R  # rope cos, sin of the own rows
        return
    e.add("kv latent + norm", act=ckv + R, f32=ckv + 1, gemm=ckv)
    v_cols = Q if V < Q else V
    e.add("attention core q k v out", act=2 * H * Q + H * v_cols + H * Q)
    e.add("attention logsumexp", f32=H)
    e.add("o_proj input", gemm=H * V)
    e.per_microbatch_act += 2 * seq_len * R  # rope cos, sin


def swiglu_elems(e: Elems, label: str, width: float, *, rows_per_token: float = 1.0) -> None:
    """gate, silu(gate), up (act) and the down-projection input (gemm)."""
    e.add(label, act=3 * width * rows_per_token, gemm=width * rows_per_token)


def layer_elems(cfg: ModelConfig, layer: int, *, seq_len: int, recompute: str = "none", cp: int = 1) -> Elems:
    """Saved elements per token of transformer layer `layer` (>= num_hidden_layers: MTP blocks);
    `seq_len`: the rows of one rank (the sequence / cp)."""
    e = Elems()
    attention_elems(cfg, e, seq_len=seq_len, recompute=recompute, cp=cp)
    D = cfg.hidden_size
    inner = recompute == "none"
    if not cfg.is_moe_layer(layer):
        if recompute == "full":
            e.add("dense block input", act=D)  # the recomputed block keeps its input only
            return e
        _norm(e, "ffn norm", D)
        if inner:
            swiglu_elems(e, "dense SwiGLU", cfg.intermediate_size)
        return e
    K, E, width = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size
    if recompute == "full":
        e.add("attention step input", act=D)
    _norm(e, "ffn norm", D)
    e.add("router", f32=E + 2 * K + 2, i64=K)
    e.add("dispatch order + rows", i64=K, gemm=K * D)
    if inner:
        swiglu_elems(e, "routed experts", width, rows_per_token=K)
    e.add("combine", i64=K, act=2 * K * D, f32=K)
    if cfg.n_shared_experts and inner:
        swiglu_elems(e, "shared experts", width * cfg.n_shared_experts)
    return e


def embedding_elems() -> Elems:
    e = Elems()
    e.add("token ids", i64=1)
    return e


def head_elems(cfg: ModelConfig, *, chunked_loss: bool) -> Elems:
    """Final norm, output head input and the float32 log-softmax (unless the loss is chunked)."""
    e = Elems()
    _norm(e, "final norm", cfg.hidden_size)
    if not chunked_loss:
        e.add("log-softmax", f32=cfg.vocab_size)
    return e


def mtp_elems(cfg: ModelConfig, *, seq_len: int, recompute: str, chunked_loss: bool, cp: int = 1) -> Elems:
    """One MTP depth per token of the main sequence (its T - k positions folded in by the caller)."""
    D = cfg.hidden_size
    e = Elems()
    e.add("mtp token ids", i64=1)
    e.add("mtp input norms", f32=2 * (D + 1) + 2 * D)  # enorm x, xn; hnorm xn (its input is the main h)
    e.add("mtp concat", gemm=2 * D)
    block = layer_elems(cfg, cfg.num_hidden_layers, seq_len=seq_len, recompute=recompute, cp=cp)
    for k in ("f32", "act", "gemm", "i64"):
        setattr(e, k, getattr(e, k) + getattr(block, k))
    e.per_microbatch_act += block.per_microbatch_act
    e.parts.update({f"mtp {k}": v for k, v in block.parts.items()})
    head = head_elems(cfg, chunked_loss=chunked_loss)
    e.add("mtp norm + log-softmax", f32=head.f32, gemm=head.gemm)
    return e
