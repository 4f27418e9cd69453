"""Rotary position embedding for the decoupled rope part of MLA, with YaRN.

We always rotate in the *half-split* layout (dims [0, R/2) pair with [R/2, R)). Hugging Face
checkpoints store the rope rows of `q_b_proj`/`q_proj` and `kv_a_proj_with_mqa` in DeepSeek's
*interleaved* pair order; `megads.convert.hf` permutes those rows on import and back on
export, so the math here stays the textbook one (see SPEC.md, "RoPE layout trap").

YaRN (arXiv 2309.00071, as used by DeepSeek-V3): frequencies are blended between the
original (extrapolation) and divided-by-factor (interpolation) values with a linear ramp over
the correction range [low, high] derived from beta_fast/beta_slow; cos/sin are scaled by
mscale(s, mscale)/mscale(s, mscale_all_dim), and the softmax scale by mscale(s, mscale_all_dim)^2
(`ModelConfig.softmax_scale`).

Shapes: T sequence, R rope dim (qk_rope_head_dim).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
from torch import nn

from megads.model.config import ModelConfig, yarn_mscale


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin amplitude factor for `cfg`."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq_extra = 1.0 / pos_freqs
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq_extra, 1.0
    inv_freq_inter = 1.0 / (rs.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extra_weight = 1.0 - ramp
    inv_freq = inv_freq_inter * (1 - extra_weight) + inv_freq_extra * extra_weight
    if rs.mscale and rs.mscale_all_dim:
        amplitude = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        amplitude = yarn_mscale(rs.factor)
    return inv_freq, float(amplitude)


class SequenceShard(Protocol):
    """The rows of a sequence this process holds, when the other rows live elsewhere (context
    parallel, `megads.parallel.context_parallel`). Attention needs only two things from it."""

    def gather(self, rows_BTX: torch.Tensor) -> torch.Tensor:
        """Every holder's rows of a per-token tensor, [B, S, X] in position order (S = whole
        sequence); differentiable (the gradient of the rows comes back to their holder)."""
        ...

    def runs(self) -> list[tuple[int, int, int]]:
        """(first row, end row, end position): rows [lo, hi) hold the consecutive positions
        [end - (hi - lo), end), in ascending order; every row is in one run."""
        ...


class RopeCache(NamedTuple):
    """cos/sin of the rows a block sees, and where those rows sit in their sequence.

    `shard` None: the rows are the whole sequence, positions 0..T-1 (single device, pipeline,
    expert parallel). Otherwise they are a piece of it (context parallel) and the attention
    gathers the other pieces' keys through it.
    """

    cos_TR: torch.Tensor
    sin_TR: torch.Tensor
    shard: SequenceShard | None = None


class RotaryEmbedding(nn.Module):
    """Produces (cos_TR, sin_TR) for positions 0..T-1 (or given positions)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # computed on the CPU even inside `with torch.device("meta")` (a model built for its shapes):
        # meta arithmetic runs torch's Python references, whose first use imports torch._dynamo
        # (about 1.3 s of a process start); model.to / to_empty move the buffer like any other
        with torch.device("cpu"):
            inv_freq, amplitude = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.amplitude = amplitude

    def forward(
        self, positions_T: torch.Tensor, *, dtype: torch.dtype, shard: SequenceShard | None = None
    ) -> RopeCache:
        freqs_TR2 = positions_T.float()[:, None] * self.inv_freq.to(positions_T.device)[None, :]
        emb_TR = torch.cat((freqs_TR2, freqs_TR2), dim=-1)
        return RopeCache((emb_TR.cos() * self.amplitude).to(dtype), (emb_TR.sin() * self.amplitude).to(dtype), shard)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_BTHR: torch.Tensor, cos_TR: torch.Tensor, sin_TR: torch.Tensor) -> torch.Tensor:
    """Rotate the last dim of x [B, T, H, R] (half-split layout)."""
    cos = cos_TR[None, :, None, :]
    sin = sin_TR[None, :, None, :]
    return x_BTHR * cos + rotate_half(x_BTHR) * sin


def interleaved_to_half_split(dim: int) -> torch.Tensor:
    """Index p with half_split[j] = interleaved[p[j]]: evens first, then odds."""
    return torch.cat([torch.arange(0, dim, 2), torch.arange(1, dim, 2)])
