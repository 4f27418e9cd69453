"""Multi-head Latent Attention (DeepSeek-V2 §2.1, DeepSeek-V3 §2.1.1).

    query:  c_q = RMSNorm(W_DQ h)            (skipped when q_lora_rank is None: q = W_Q h)
            [q_nope ; q_rope] = W_UQ c_q      per head: qk_nope_head_dim + qk_rope_head_dim
    kv:     [c_kv ; k_rope] = W_DKV h         c_kv: kv_lora_rank, k_rope: ONE shared rope key
            [k_nope ; v] = W_UKV RMSNorm(c_kv)
    attn:   softmax(q k^T * scale) v,  q = [q_nope ; RoPE(q_rope)], k = [k_nope ; RoPE(k_rope)]

Only c_kv and k_rope would need caching at inference. Training runs causal attention through
`scaled_dot_product_attention`. The rope rotation is half-split (see rope.py).

When the rows are a piece of their sequence (`rope.shard`, context parallel), the keys and
values of the other pieces come from their *latent*: the shard gathers [c_kv ; RoPE(k_rope)]
(kv_lora_rank + qk_rope_head_dim values a token, 576 for DeepSeek-V3, instead of the
H * (P + R + V) = 40,960 of per-head keys and values), every row then up-projects the keys it
needs itself, and the mask is causal in global positions. The math is the same attention.

Shapes: B batch, T sequence (this shard's rows), S key positions (T, or the whole sequence under a
shard), D hidden, H heads, C kv_lora_rank, R rope dim, P nope dim, V v dim, X latent (C + R).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megads.model.config import ModelConfig
from megads.model.linear import LinearFactory
from megads.model.norm import RMSNorm
from megads.model.rope import RopeCache, apply_rope


def causal_lower_right(seq_len_q: int, seq_len_kv: int) -> torch.Tensor:
    """torch's bottom-right-aligned causal mask object (no [T, S] tensor is made on CUDA).
    Imported on first use: `torch.nn.attention.bias` imports torch._dynamo, 1-3 s at every process
    start, which only context parallel needs."""
    from torch.nn.attention.bias import causal_lower_right as make  # noqa: PLC0415

    return make(seq_len_q, seq_len_kv)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, *, factory: LinearFactory) -> None:
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.softmax_scale = cfg.softmax_scale()
        qk_dim = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = factory.linear(cfg.hidden_size, self.n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = factory.linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps)
            self.q_b_proj = factory.linear(cfg.q_lora_rank, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = factory.linear(
            cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps)
        self.kv_b_proj = factory.linear(cfg.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = factory.linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, x_BTD: torch.Tensor, rope: RopeCache) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        cos_TR, sin_TR, shard = rope.cos_TR, rope.sin_TR, rope.shard
        if self.q_lora_rank is None:
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHQ = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope_BTHP, q_rope_BTHR = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)

        kv = self.kv_a_proj_with_mqa(x_BTD)
        c_kv_BTC, k_rope_BTR = kv.split([self.kv_rank, self.rope_dim], dim=-1)
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos_TR, sin_TR)
        k_rope_BTR = apply_rope(k_rope_BTR.unsqueeze(2), cos_TR, sin_TR).squeeze(2)
        q_BTHQ = torch.cat([q_nope_BTHP, q_rope_BTHR], dim=-1)
        if shard is None:  # keys: the rows themselves, causal
            out_BTX = self.attend(q_BTHQ, c_kv_BTC, k_rope_BTR, None)
        else:
            # the other pieces' keys from their latents: [c_kv ; RoPE(k_rope)] of all S positions.
            # The per-head keys and values of the S positions (S x H(P+R+V) values) are recomputed
            # from the gathered latent (S x (C+R)) in the backward instead of being kept.
            # k_rope comes out of the rotation in float32 (the cos/sin tables); in the GEMMs' dtype
            # (bf16 under autocast) the exchange moves half the bytes, and attention casts it there anyway
            latent_BSX = shard.gather(torch.cat([c_kv_BTC, k_rope_BTR.to(c_kv_BTC.dtype)], dim=-1))
            c_kv_BSC, k_rope_BSR = latent_BSX.split([self.kv_rank, self.rope_dim], dim=-1)
            out_BTX = checkpoint(self.attend, q_BTHQ, c_kv_BSC, k_rope_BSR, shard.runs(), use_reentrant=False)
        return self.o_proj(out_BTX)

    def attend(
        self, q_BTHQ: torch.Tensor, c_kv_BSC: torch.Tensor, k_rope_BSR: torch.Tensor,
        runs: list[tuple[int, int, int]] | None,
    ) -> torch.Tensor:
        """Attention of the queries over the keys/values up-projected from the latent c_kv and the
        shared rope key (already rotated). `runs` None: the S = T rows themselves, causal; else
        each run (rows [lo, hi) at positions [end - (hi - lo), end)) attends keys [0, end) under
        a causal mask aligned to the bottom right (no [T, S] mask is made; see SequenceShard)."""
        B, T = q_BTHQ.shape[:2]
        S = c_kv_BSC.shape[1]
        kv_BSHX = self.kv_b_proj(self.kv_a_layernorm(c_kv_BSC)).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope_BSHP, v_BSHV = kv_BSHX.split([self.nope_dim, self.v_dim], dim=-1)
        k_BSHQ = torch.cat([k_nope_BSHP, k_rope_BSR.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)], dim=-1)
        # Flash kernels (CPU and CUDA) need one head dim for q, k and v; with v_head_dim <
        # qk_head_dim SDPA would fall back to the math path, which materialises the [T, T]
        # scores. Zero columns appended to v leave the first v_dim output columns unchanged.
        qk_dim = self.nope_dim + self.rope_dim
        if self.v_dim < qk_dim:
            v_BSHV = F.pad(v_BSHV, (0, qk_dim - self.v_dim))
        # SDPA wants [B, H, T, *]
        q_BHTQ, k_BHSQ, v_BHSV = q_BTHQ.transpose(1, 2), k_BSHQ.transpose(1, 2), v_BSHV.transpose(1, 2)
        if runs is None:
            out_BHTV = F.scaled_dot_product_attention(q_BHTQ, k_BHSQ, v_BHSV, is_causal=True, scale=self.softmax_scale)
        else:
            # a mask object bypasses autocast's cast of SDPA's inputs: the GEMMs' dtype for all three
            q_BHTQ, k_BHSQ = q_BHTQ.to(v_BHSV.dtype), k_BHSQ.to(v_BHSV.dtype)
            out_BHTV = torch.cat([
                F.scaled_dot_product_attention(
                    q_BHTQ[:, :, lo:hi], k_BHSQ[:, :, :end], v_BHSV[:, :, :end],
                    attn_mask=causal_lower_right(hi - lo, end), scale=self.softmax_scale,
                ) for lo, hi, end in runs], dim=2)
        out_BHTV = out_BHTV[..., : self.v_dim]
        return out_BHTV.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim)
