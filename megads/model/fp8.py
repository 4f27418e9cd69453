"""FP8 GEMMs with DeepSeek-V3's fine-grained scaling, emulated exactly in plain PyTorch.

The numerics (DeepSeek-V3 report, section 3.3; SPEC.md "Parallelism and precision"):

- every operand of every GEMM is E4M3 (`torch.float8_e4m3fn`, largest finite value 448);
- activations and output gradients carry one FP32 scale per 1 x 128 tile along the GEMM's
  contraction dimension (K): for the forward and the input gradient that is a row of 128
  channels of one token, for the weight gradient (which contracts over tokens) a column of 128
  tokens of one channel;
- weights carry one scale per 128 x 128 block, the same blocks for W (forward) and W^T (input
  gradient);
- a scale is the tile's max-abs over 448, so the tile's largest element maps to 448 (with
  `pow2_scales`, rounded up to a power of two, as Transformer Engine's block-scaling recipe does
  by default: scaling is then exact in binary); an all-zero tile gets scale 1;
- products are accumulated in FP32 with promotion every 128 elements of K: the emulation
  dequantises each operand block (fp8 value x its scale, in FP32) and runs one FP32 GEMM per
  128-wide K chunk, adding the chunks' results in K order.

Shapes that are not multiples of 128: the last tile (or block) of a dimension is simply shorter,
which equals zero padding to the next multiple (zeros change neither a max-abs nor a sum).

`fp8_linear` / `fp8_grouped_mm` are autograd functions with these numerics in all three GEMMs
(forward, input gradient, weight gradient); `Fp8Linear` and `Fp8GroupedLinear` are the layers,
with the same parameters (names, shapes, FP32 master values) as their native twins, so
checkpoints and Hugging Face conversion do not see the difference.

Shapes: N rows (tokens), K contraction, O output features, E experts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from megads.model.fp8_scaled_mm import blockwise_missing
from megads.model.linear import GroupedLinear, Linear, LinearFactory, WeightGradSlot

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128


def _n_blocks(n: int) -> int:
    return -(-n // BLOCK)


def _pad_to_blocks(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """`t` zero-padded at the end of each of `dims` to a multiple of BLOCK."""
    pad: list[int] = [0] * (2 * t.dim())
    for d in dims:
        extra = _n_blocks(t.shape[d]) * BLOCK - t.shape[d]
        pad[2 * (t.dim() - 1 - d) + 1] = extra
    return F.pad(t, pad) if any(pad) else t


def scales_from_amax(amax: torch.Tensor, *, pow2: bool) -> torch.Tensor:
    """FP32 scales that map each max-abs to E4M3_MAX (x = fp8 * scale); 1 where amax is 0."""
    amax = amax.float()
    scale = amax / E4M3_MAX
    if pow2:
        # the smallest power of two >= amax / 448, exactly (frexp: scale = m * 2^e, m in [0.5, 1));
        # x / scale then stays within 448 and the scaling itself is exact in binary
        mantissa, exponent = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).to(exponent.dtype))
    return torch.where(amax > 0, scale, torch.ones_like(scale))


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    # saturate: x / scale can round just past 448, and the cast would turn that into NaN
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _amax(tiles: torch.Tensor, dims: tuple[int, ...], *, keepdim: bool = False) -> torch.Tensor:
    """max |x| over `dims`; over one dimension in a single read (aminmax), without the full-size
    |x| copy. The same values as x.abs().amax(dims) (negation and max are exact)."""
    if len(dims) == 1:
        lo, hi = torch.aminmax(tiles, dim=dims[0], keepdim=keepdim)
        return torch.maximum(lo.neg_(), hi)
    return tiles.abs().amax(dim=dims, keepdim=keepdim)


def _quant_dequant(tiles: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / s, saturated, to E4M3 and back, times s (`scale` broadcasts over `tiles`)."""
    q = tiles / scale
    q.clamp_(-E4M3_MAX, E4M3_MAX)
    return q.to(E4M3).float().mul_(scale)


def _fake_quant_eager(tiles: torch.Tensor, dims: tuple[int, ...], pow2: bool) -> torch.Tensor:
    """E4M3 with one scale per slice over `dims` of `tiles`, dequantised to FP32: the same
    elementwise operations as quantise-then-dequantise (x / s, saturate, cast, back, times s),
    fused into one temporary and broadcast scales (no repeat_interleave copies)."""
    scale = scales_from_amax(_amax(tiles, dims, keepdim=True), pow2=pow2)  # broadcasts over `dims`
    return _quant_dequant(tiles, scale)


# Eager CPU runs each operation above as its own pass over the tensor, and the two E4M3 casts
# are not vectorised (about 5 ns an element each): quantisation was ~70% of the emulated grouped
# GEMM's time. Compiled, inductor fuses the chain into one or two loops. The operations and their
# order are the same, each exact or correctly rounded (max, division, the RNE cast,
# multiplication by the scale), so the bits are the same: tests/test_fp8.py compares the two
# paths bit for bit. (That rests on inductor's vectorised E4M3 cast rounding as the scalar one
# does; torch 2.13's AVX10.2 variant of it, which inductor does not use, rounds through FP16.)
# Inductor's loop for a max over a middle dimension (the weight gradient's 128-token tiles) is
# slower than eager's, so there the max and the scales stay eager and only the elementwise chain
# is compiled. Below FUSED_MIN_NUMEL the eager passes are cheap and a compile would cost more
# than it saves. MEGADS_FP8_EAGER_QUANT=1 keeps everything eager (same results; no compile time,
# e.g. for short test processes).
FUSED_MIN_NUMEL = 1 << 16
EAGER_QUANT_ENV = "MEGADS_FP8_EAGER_QUANT"


def _fused_rows(tiles_RT: torch.Tensor, pow2: bool) -> torch.Tensor:
    """Tiles along the last dimension, as [tiles, 128]."""
    return _fake_quant_eager(tiles_RT, (1,), pow2)


def _fused_blocks(blocks_GBKB: torch.Tensor, pow2: bool) -> torch.Tensor:
    """128 x 128 blocks as [row blocks, 128, column blocks, 128]."""
    return _fake_quant_eager(blocks_GBKB, (1, 3), pow2)


# One compiled function per tile pattern, on canonical shapes (not views), so each compiles for
# a few shape classes (the recompile limit is per function: `small` needs two for the blocks,
# one each otherwise). None marks a function whose compile failed: it runs eagerly from then on.
_compiled: dict[str, Callable[..., torch.Tensor] | None] = {}


def _eager_quant_forced() -> bool:
    return os.environ.get(EAGER_QUANT_ENV) == "1"


def _fake_quant(tiles: torch.Tensor, dims: tuple[int, ...], pow2: bool) -> torch.Tensor:
    """`_fake_quant_eager`'s values; on CPU, for tensors of at least FUSED_MIN_NUMEL elements,
    computed with compiled kernels (the same bits, 2-5x faster)."""
    # is_compiling first: under an outer compile the size test would add a guard to its graph;
    # a caller that differentiates through the quantisation gets the (differentiable) eager path
    if (torch.compiler.is_compiling() or tiles.device.type != "cpu" or tiles.numel() < FUSED_MIN_NUMEL
            or _eager_quant_forced() or (tiles.requires_grad and torch.is_grad_enabled())):
        return _fake_quant_eager(tiles, dims, pow2)
    nd = tiles.dim()
    pattern = tuple(sorted(d % nd for d in dims))
    fn = _fused_rows if pattern == (nd - 1,) else _fused_blocks if pattern == (nd - 3, nd - 1) else _quant_dequant
    if _compiled.get(fn.__name__, fn) is None:  # its compile failed before
        return _fake_quant_eager(tiles, dims, pow2)
    # detach: no autograd here (the FP8 functions define their own gradients), and a tensor that
    # is not a view, so dynamo does not guard on (and recompile for) each caller's base tensor
    if fn is _fused_rows:
        args: tuple = (tiles.reshape(-1, tiles.shape[-1]).detach(), pow2)
    elif fn is _fused_blocks:
        args = (tiles.reshape(-1, *tiles.shape[-3:]).detach(), pow2)
    else:  # a max over another dimension: eager max and scales, compiled elementwise chain
        args = (tiles.detach(), scales_from_amax(_amax(tiles, dims, keepdim=True), pow2=pow2))
    try:
        if fn.__name__ not in _compiled:  # torch.compile itself refuses some Pythons: inside the try
            # fullgraph: a graph break or the recompile limit raises (caught below: eager from
            # then on, with a warning) instead of silently running part of the function eagerly
            _compiled[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
        fused = _compiled[fn.__name__]
        assert fused is not None
        with torch.no_grad():  # one guard set whatever the caller's grad mode
            return fused(*args).view(tiles.shape)
    except Exception as err:  # noqa: BLE001 - any compiler failure: the eager path has the same bits
        _compiled[fn.__name__] = None
        log.warning("fp8 emulation: compiling the quantisation (%s) failed (%s: %.300s); using the "
                    "eager path, with the same results, slower", fn.__name__, type(err).__name__, err)
        return _fake_quant_eager(tiles, dims, pow2)


def quantize_tiles(x_NK: torch.Tensor, *, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x 128 tiles along the last dimension: (E4M3 values [N, K], FP32 scales [N, ceil(K/128)])."""
    n, k = x_NK.shape
    tiles = _pad_to_blocks(x_NK.float(), (1,)).view(n, -1, BLOCK)
    scale = scales_from_amax(_amax(tiles, (2,)), pow2=pow2)
    q = _to_e4m3(tiles / scale.unsqueeze(2)).view(n, -1)[:, :k]
    return q, scale


def quantize_blocks(w_OK: torch.Tensor, *, pow2: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """128 x 128 blocks of the last two dimensions (any leading ones, e.g. experts):
    (E4M3 values [..., O, K], FP32 scales [..., ceil(O/128), ceil(K/128)])."""
    *lead, o, k = w_OK.shape
    nd = w_OK.dim()
    padded = _pad_to_blocks(w_OK.float(), (nd - 2, nd - 1))
    ob, kb = padded.shape[-2] // BLOCK, padded.shape[-1] // BLOCK
    blocks = padded.view(*lead, ob, BLOCK, kb, BLOCK)
    scale = scales_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2=pow2)
    q = _to_e4m3(blocks / scale[..., :, None, :, None]).view(*lead, ob * BLOCK, kb * BLOCK)[..., :o, :k]
    return q, scale


def dequantize_tiles(q_NK: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP32 values of 1 x 128 tiles along the last dimension."""
    n, k = q_NK.shape
    tiles = _pad_to_blocks(q_NK.float(), (1,)).view(n, -1, BLOCK)
    return (tiles * scale.unsqueeze(2)).view(n, -1)[:, :k]


def dequantize_blocks(q_OK: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP32 values of 128 x 128 blocks (of the last two dimensions)."""
    o, k = q_OK.shape[-2:]
    full = scale.repeat_interleave(BLOCK, dim=-2)[..., :o, :].repeat_interleave(BLOCK, dim=-1)[..., :k]
    return q_OK.float() * full


def chunked_mm(a_NK: torch.Tensor, b_KM: torch.Tensor) -> torch.Tensor:
    """a @ b in FP32, one GEMM per 128-wide chunk of K, the chunks' results added in K order
    (the promotion to FP32 every 128 elements of K of DeepSeek's FP8 GEMM)."""
    k = a_NK.shape[1]
    out = torch.mm(a_NK[:, :BLOCK], b_KM[:BLOCK])
    for start in range(BLOCK, k, BLOCK):
        out += torch.mm(a_NK[:, start:start + BLOCK], b_KM[start:start + BLOCK])
    return out


def fake_quant_tiles(x_NK: torch.Tensor, *, pow2: bool) -> torch.Tensor:
    """x after E4M3 with 1 x 128 tile scales along the last dimension, in FP32."""
    n, k = x_NK.shape
    tiles = _pad_to_blocks(x_NK.float(), (1,)).view(n, -1, BLOCK)
    return _fake_quant(tiles, (2,), pow2).view(n, -1)[:, :k]


def fake_quant_blocks(w_OK: torch.Tensor, *, pow2: bool) -> torch.Tensor:
    """w after E4M3 with 128 x 128 block scales, in FP32."""
    *lead, o, k = w_OK.shape
    nd = w_OK.dim()
    padded = _pad_to_blocks(w_OK.float(), (nd - 2, nd - 1))
    ob, kb = padded.shape[-2] // BLOCK, padded.shape[-1] // BLOCK
    blocks = padded.view(*lead, ob, BLOCK, kb, BLOCK)
    return _fake_quant(blocks, (-3, -1), pow2).view(*lead, ob * BLOCK, kb * BLOCK)[..., :o, :k]


def fp8_forward(x_NK: torch.Tensor, w_OK: torch.Tensor, *, pow2: bool) -> torch.Tensor:
    """y = x @ w^T: x in 1 x 128 tiles along K, w in 128 x 128 blocks; FP32 result [N, O]."""
    return _forward_dq(fake_quant_tiles(x_NK, pow2=pow2), fake_quant_blocks(w_OK, pow2=pow2))


def _forward_dq(x_dq: torch.Tensor, w_dq: torch.Tensor) -> torch.Tensor:
    if x_dq.shape[0] == 0:
        return x_dq.new_zeros(0, w_dq.shape[0])
    return chunked_mm(x_dq, w_dq.t())


def fp8_input_grad(g_NO: torch.Tensor, w_OK: torch.Tensor, *, pow2: bool) -> torch.Tensor:
    """dx = g @ w: g in 1 x 128 tiles along O (the contraction), w in its 128 x 128 blocks."""
    return _input_grad_dq(fake_quant_tiles(g_NO, pow2=pow2), fake_quant_blocks(w_OK, pow2=pow2))


def _input_grad_dq(g_dq: torch.Tensor, w_dq: torch.Tensor) -> torch.Tensor:
    if g_dq.shape[0] == 0:
        return g_dq.new_zeros(0, w_dq.shape[1])
    return chunked_mm(g_dq, w_dq)


def fp8_weight_grad(g_NO: torch.Tensor, x_NK: torch.Tensor, *, pow2: bool) -> torch.Tensor:
    """dw = g^T @ x, contracting over tokens: both in 128 x 1 tiles (128 tokens of one channel)."""
    if g_NO.shape[0] == 0:
        return g_NO.new_zeros(g_NO.shape[1], x_NK.shape[1], dtype=torch.float32)
    g_ON = fake_quant_tiles(g_NO.t(), pow2=pow2)
    x_KN = fake_quant_tiles(x_NK.t(), pow2=pow2)
    return chunked_mm(g_ON, x_KN.t())


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    """The GEMM output's dtype: the autocast dtype inside autocast (BF16 on GPUs), else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _Fp8Linear(torch.autograd.Function):
    # The emulation keeps the dequantised weight from the forward for the input gradient (the
    # same values a re-quantisation would give): one FP32 weight copy per layer until its backward.
    @staticmethod
    def forward(ctx, x_NK: torch.Tensor, w_OK: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                pow2: bool, out_dtype: torch.dtype, slot: WeightGradSlot | None = None) -> torch.Tensor:
        w_dq = fake_quant_blocks(w_OK, pow2=pow2)
        y = _forward_dq(fake_quant_tiles(x_NK, pow2=pow2), w_dq)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x_NK, w_dq)
        ctx.pow2, ctx.has_bias, ctx.x_dtype, ctx.w_dtype = pow2, bias is not None, x_NK.dtype, w_OK.dtype
        ctx.slot = slot
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):  # type: ignore[override]
        x_NK, w_dq = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad_dq(fake_quant_tiles(g_NO, pow2=ctx.pow2), w_dq).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            pow2, w_dtype = ctx.pow2, ctx.w_dtype

            def weight_grad() -> torch.Tensor:
                return fp8_weight_grad(g_NO, x_NK, pow2=pow2).to(w_dtype)

            grad_w = weight_grad() if ctx.slot is None else ctx.slot.take(weight_grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_NO.float().sum(0).to(ctx.w_dtype)  # a sum, no GEMM: full precision
        return grad_x, grad_w, grad_b, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               pow2: bool = True, slot: WeightGradSlot | None = None) -> torch.Tensor:
    """F.linear with the FP8 numerics above in its three GEMMs (any leading dimensions of x)."""
    out_dtype = _out_dtype(x)
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):  # the function does its own casts
        y = _Fp8Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias, pow2, out_dtype, slot)
    return y.view(*lead, weight.shape[0])


def expert_rows(counts: list[int]) -> Iterator[tuple[int, slice]]:
    """(expert, its slice of rows) for every expert with rows, the rows grouped in expert order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _grouped_kernel_usable(x_dq: torch.Tensor, w_dq: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run the emulation's per-chunk grouped GEMMs here: the
    conditions of `megads.model.linear.grouped_kernel_usable` for FP32 operands on CPU (the
    emulation's operands are FP32; CUDA's kernel takes BF16 only, so GPUs run the loop)."""
    return (x_dq.device.type == "cpu" and hasattr(torch, "_grouped_mm") and x_dq.shape[0] > 0
            and w_dq.shape[-1] % 8 == 0 and w_dq.shape[-2] % 8 == 0)


def _grouped_chunked_mm(a_NK: torch.Tensor, b_EKM: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`chunked_mm` of every expert's rows with its own matrix, for all experts at once: one
    `torch._grouped_mm` per 128-wide chunk of K, the chunks added in K order. Bit-identical to the
    per-expert loop (`torch._grouped_mm` on CPU runs the same GEMM per group, checked in
    tests/test_fp8.py)."""
    k = a_NK.shape[1]
    out = torch._grouped_mm(a_NK[:, :BLOCK], b_EKM[:, :BLOCK], offs=offs)
    for start in range(BLOCK, k, BLOCK):
        out += torch._grouped_mm(a_NK[:, start:start + BLOCK], b_EKM[:, start:start + BLOCK], offs=offs)
    return out


def _fake_quant_token_tiles(x_NK: torch.Tensor, counts: list[int], pow2: bool) -> torch.Tensor:
    """Every expert's rows through E4M3 in 128 x 1 tiles along tokens (the weight gradient's
    contraction), tiles starting at the expert's first row, all experts at once: the rows are
    placed in a zero-padded buffer where each expert starts at a multiple of 128 (zeros change
    no max-abs), quantised as [tiles, 128, K], and gathered back. The same values as quantising
    each expert's rows on its own."""
    n, k = x_NK.shape
    src, dst, base = [], [], 0
    start = 0
    for c in counts:
        if c:
            src.append((start, c))
            dst.append(base)
            base += _n_blocks(c) * BLOCK
        start += c
    index = torch.cat([torch.arange(d, d + c) for (_, c), d in zip(src, dst)]) if src else torch.zeros(0, dtype=torch.long)
    index = index.to(x_NK.device)
    padded = x_NK.new_zeros(base, k, dtype=torch.float32).index_copy_(0, index, x_NK.float())
    dq = _fake_quant(padded.view(-1, BLOCK, k), (1,), pow2).view(base, k)
    return dq.index_select(0, index)


def _grouped_weight_grad_kernel(g_dq: torch.Tensor, x_dq: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """dw[e] = sum over e's 128-token chunks (in token order) of g_chunk^T @ x_chunk, all experts at
    once: round r takes every expert's r-th chunk (one `torch._grouped_mm` over tokens, experts
    without a chunk r get zeros) and the rounds are added in order (adding a zero is exact)."""
    rounds = max(_n_blocks(c) for c in counts)
    device = g_dq.device
    if rounds == 1:
        offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(g_dq.t(), x_dq, offs=offs)
    starts = [0]
    for c in counts[:-1]:
        starts.append(starts[-1] + c)
    out = None
    for r in range(rounds):
        sizes = [max(0, min(BLOCK, c - r * BLOCK)) for c in counts]
        rows = [torch.arange(s + r * BLOCK, s + r * BLOCK + m) for s, m in zip(starts, sizes) if m]
        index = torch.cat(rows).to(device)
        offs = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
        part = torch._grouped_mm(g_dq.index_select(0, index).t(), x_dq.index_select(0, index), offs=offs)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


class _Fp8GroupedMM(torch.autograd.Function):
    """Expert e: its contiguous rows times w[e]^T, each expert with its own scales.

    A 1 x 128 tile along K lies inside one row, so the activations (forward) and output
    gradients (input gradient) are quantised for all rows at once, and all experts' weight blocks
    at once: the same values as expert by expert. Only the weight gradient's 128-token tiles
    depend on the grouping: quantised per expert. Where `torch._grouped_mm` can run (FP32 on CPU,
    sizes multiples of 8) each GEMM runs for all experts at once; otherwise a loop over experts,
    with the same bits.
    """

    @staticmethod
    def forward(ctx, x_NK: torch.Tensor, w_EOK: torch.Tensor, counts: list[int],  # type: ignore[override]
                pow2: bool, out_dtype: torch.dtype, slot: WeightGradSlot | None = None) -> torch.Tensor:
        x_dq = fake_quant_tiles(x_NK, pow2=pow2)
        w_dq = fake_quant_blocks(w_EOK, pow2=pow2)
        kernel = _grouped_kernel_usable(x_dq, w_dq)
        if kernel:
            offs = torch.tensor(counts, device=x_NK.device).cumsum(0).to(torch.int32)
            y = _grouped_chunked_mm(x_dq, w_dq.transpose(1, 2), offs).to(out_dtype)
        else:
            y = x_NK.new_empty(x_NK.shape[0], w_EOK.shape[1], dtype=out_dtype)
            for e, rows in expert_rows(counts):
                y[rows] = _forward_dq(x_dq[rows], w_dq[e])
        ctx.save_for_backward(x_NK, w_dq)
        ctx.counts, ctx.pow2, ctx.w_dtype, ctx.slot, ctx.kernel = counts, pow2, w_EOK.dtype, slot, kernel
        return y

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):  # type: ignore[override]
        x_NK, w_dq = ctx.saved_tensors
        counts, pow2, w_dtype, kernel = ctx.counts, ctx.pow2, ctx.w_dtype, ctx.kernel
        grad_x = None
        if ctx.needs_input_grad[0]:
            g_dq = fake_quant_tiles(g_NO, pow2=pow2)
            if kernel:
                offs = torch.tensor(counts, device=g_NO.device).cumsum(0).to(torch.int32)
                grad_x = _grouped_chunked_mm(g_dq, w_dq, offs).to(x_NK.dtype)
            else:
                grad_x = x_NK.new_empty(x_NK.shape)
                for e, rows in expert_rows(counts):
                    grad_x[rows] = _input_grad_dq(g_dq[rows], w_dq[e])

        def weight_grad() -> torch.Tensor:
            if kernel:
                g_tok = _fake_quant_token_tiles(g_NO, counts, pow2)
                x_tok = _fake_quant_token_tiles(x_NK, counts, pow2)
                return _grouped_weight_grad_kernel(g_tok, x_tok, counts).to(w_dtype)
            grad_w = w_dq.new_zeros(w_dq.shape, dtype=w_dtype)
            for e, rows in expert_rows(counts):
                grad_w[e] = fp8_weight_grad(g_NO[rows], x_NK[rows], pow2=pow2)
            return grad_w

        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad() if ctx.slot is None else ctx.slot.take(weight_grad)
        return grad_x, grad_w, None, None, None, None


def fp8_grouped_mm(x_NK: torch.Tensor, w_EOK: torch.Tensor, counts: list[int], *, pow2: bool = True,
                   slot: WeightGradSlot | None = None) -> torch.Tensor:
    """`megads.model.linear.grouped_mm` with the FP8 numerics: one scale set per expert."""
    out_dtype = _out_dtype(x_NK)
    with torch.autocast(x_NK.device.type, enabled=False):
        return _Fp8GroupedMM.apply(x_NK, w_EOK, counts, pow2, out_dtype, slot)


class Fp8Linear(Linear):
    """nn.Linear whose GEMMs run in block-scaled FP8 (the emulation); FP32 master weight."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, pow2: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.pow2 = pow2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, pow2=self.pow2, slot=self.wgrad_slot)


class Fp8GroupedLinear(GroupedLinear):
    """GroupedLinear whose per-expert GEMMs run in block-scaled FP8 (the emulation)."""

    def __init__(self, num: int, in_features: int, out_features: int, *, pow2: bool = True) -> None:
        super().__init__(num, in_features, out_features)
        self.pow2 = pow2

    def forward(self, x_NI: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert len(counts) == self.num, (len(counts), self.num)
        return fp8_grouped_mm(x_NI, self.weight, counts, pow2=self.pow2, slot=self.wgrad_slot)


class Fp8Factory(LinearFactory):
    """The FP8 backend of the linear entry point: every linear of the transformer blocks, the
    shared and routed experts and the MTP projection; the router, embedding, head, norms and the
    attention core are not made by the factory and stay in high precision."""

    name = "fp8-emulated"

    def __init__(self, *, pow2_scales: bool = True, dispatch: bool = True) -> None:
        self.pow2_scales = pow2_scales
        self.dispatch = dispatch

    def dispatch_codec(self) -> Fp8RowCodec | None:
        """FP8 dispatch (`Fp8RowCodec`) when asked for, else the rows cross as they are."""
        return Fp8RowCodec(pow2_scales=self.pow2_scales) if self.dispatch else None

    def linear(self, in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
        return Fp8Linear(in_features, out_features, bias=bias, pow2=self.pow2_scales)

    def grouped(self, num: int, in_features: int, out_features: int) -> nn.Module:
        return Fp8GroupedLinear(num, in_features, out_features, pow2=self.pow2_scales)


FP8_BACKENDS = ("auto", "te", "torch", "emulated")


class Fp8BackendUnavailable(ValueError):
    """fp8.backend names a backend this machine (or this build) cannot run."""


def _te_missing(device: torch.device) -> str | None:
    """Why the Transformer Engine backend cannot run here (None: it could)."""
    if device.type != "cuda":
        return f"it needs a CUDA device (this run's device is {device.type})"
    try:
        import transformer_engine.pytorch  # noqa: F401, PLC0415  (optional GPU extra)
    except ImportError as e:
        return f"transformer_engine does not import ({e}); install the [gpu] extra (README, GPU section)"
    return "its modules are not wired into the linear factory yet (docs/fp8.md, 'Backends')"


def _torch_missing(device: torch.device) -> str | None:
    """Why torch's block-scaled `scaled_mm` backend cannot run here (None: it could): a CUDA device
    of compute capability 9.0+, a torch built with CUDA >= 12.9 and a block-wise FP8 GEMM API
    (megads/model/fp8_scaled_mm.py `blockwise_missing`)."""
    return blockwise_missing(device)


def choose_fp8_backend(
    requested: str, device: torch.device, *, pow2_scales: bool = True, dispatch: bool = True
) -> tuple[Fp8Factory, str]:
    """The factory for `fp8.backend=requested` on `device` and a line saying which and why:
    `Fp8TorchFactory` (megads/model/fp8_torch.py) for torch, `Fp8Factory` for the emulation.

    `auto` takes the first of te, torch, emulated that can run; naming one that cannot is refused
    with what is missing."""
    if requested not in FP8_BACKENDS:
        raise Fp8BackendUnavailable(f"fp8.backend={requested!r} must be one of {list(FP8_BACKENDS)}")
    missing = {"te": _te_missing(device), "torch": _torch_missing(device), "emulated": None}
    if requested != "auto":
        if missing[requested] is not None:
            raise Fp8BackendUnavailable(
                f"fp8.backend={requested} cannot run: {missing[requested]}; fp8.backend=emulated runs anywhere")
        chosen = requested
    else:
        chosen = next(b for b in ("te", "torch", "emulated") if missing[b] is None)
    why = "; ".join(f"{b}: {m}" for b, m in missing.items() if m is not None and b != chosen)
    if chosen == "torch":
        from megads.model.fp8_torch import Fp8TorchFactory  # noqa: PLC0415  (it imports this module)

        factory: Fp8Factory = Fp8TorchFactory(pow2_scales=pow2_scales, dispatch=dispatch)
    else:
        factory = Fp8Factory(pow2_scales=pow2_scales, dispatch=dispatch)
    line = f"FP8 backend {chosen} (fp8.backend={requested}" + (f"; not {why}" if why and requested == "auto" else "") + ")"
    if chosen == "emulated" and device.type == "cpu":
        line += ("; quantisation eager (MEGADS_FP8_EAGER_QUANT=1)" if _eager_quant_forced()
                 else "; quantisation compiled on first use (MEGADS_FP8_EAGER_QUANT=1 keeps it eager)")
    return factory, line


class Fp8RowCodec:
    """FP8 dispatch: the rows entering the routed experts cross the all-to-all as E4M3 values plus
    their 1 x 128 FP32 scales, D + 4 * ceil(D / 128) bytes a row (vs 2 * D in BF16, 4 * D in FP32).

    `encode` quantises exactly as the experts' first GEMM does (1 x 128 tiles along D, power-of-two
    scales) and packs each row into bytes; `decode` gives the dequantised rows. The experts then
    quantise those rows again, which with power-of-two scales gives back the same values exactly
    (a dequantised tile's max-abs maps to the same, or half the, scale, and doubling an E4M3 value
    is exact), so the experts' outputs are bit-identical to a dispatch of unquantised rows. Only
    power-of-two scales have that property: the codec refuses others.
    """

    def __init__(self, *, pow2_scales: bool = True) -> None:
        if not pow2_scales:
            raise ValueError("FP8 dispatch needs fp8.pow2_scales=true (re-quantising its rows is exact only then)")

    @staticmethod
    def row_bytes(d: int) -> int:
        return d + 4 * _n_blocks(d)

    def encode(self, x_SD: torch.Tensor) -> torch.Tensor:
        """[S, D] rows -> [S, D + 4 * ceil(D/128)] bytes (uint8): the E4M3 values, then the scales."""
        q, scale = quantize_tiles(x_SD, pow2=True)
        return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)

    def decode(self, packed: torch.Tensor, d: int, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised rows [S, D] in `dtype` from `encode`'s bytes."""
        q = packed[:, :d].contiguous().view(E4M3)
        scale = packed[:, d:].contiguous().view(torch.float32)
        return dequantize_tiles(q, scale).to(dtype)
