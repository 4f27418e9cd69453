"""The `torch` FP8 backend: the emulation's numerics with PyTorch's block-scaled FP8 GEMM.

Every GEMM of `Fp8TorchLinear` (forward, input gradient, weight gradient) and of
`Fp8TorchGroupedLinear` (per expert, one scale set per expert) quantises its operands with the
emulation's own functions (`quantize_tiles` / `quantize_blocks` of megads/model/fp8.py: the same
scales, the same `pow2` rounding, the same saturation) and multiplies them with one function, the
`gemm` of quantised operands (`a @ b^T`, megads/model/fp8_scaled_mm.py `QOperand`):

- on GPUs `ScaledMmGemm`: torch's block-wise `scaled_mm` (FP32 accumulation inside the kernel,
  with the tile/block scales applied per 128-wide K chunk as DeepSeek's GEMM does);
- `emulated_gemm` here: dequantise each operand and the emulation's `chunked_mm` (one FP32 GEMM per
  128-wide chunk of K, the chunks added in K order). With it the autograd functions below equal the
  emulated backend (`fp8_linear` / `fp8_grouped_mm`) bit for bit, forward, input gradient and the
  (deferred or not) weight gradient, dense and grouped: tests/test_fp8_torch.py. That is the
  documented seam: `gemm` is an explicit argument of `fp8_linear_q` / `fp8_grouped_mm_q`, of the
  layers and of `Fp8TorchFactory`, so the only difference between the two backends' numbers is
  the GEMM (on a GPU: the kernel's accumulation order and its output rounding).

The structure is the emulation's autograd functions': the forward saves the (high-precision) input
and the quantised weight (E4M3 plus its block scales, instead of the emulation's dequantised FP32
copy); the backward computes the input gradient at once (B) and hands the weight gradient to the
layer's `WeightGradSlot` (W later through `WeightGradStash` under `deferring`, or at once). The
parameters (names, shapes, FP32 master values) are the emulation's, so checkpoints do not change.
The grouped path loops over the experts with rows (one GEMM per expert).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from megads.model.fp8 import (
    Fp8Factory,
    Fp8GroupedLinear,
    Fp8Linear,
    _out_dtype,
    chunked_mm,
    dequantize_blocks,
    dequantize_tiles,
    expert_rows,
    quantize_blocks,
    quantize_tiles,
)
from megads.model.fp8_scaled_mm import QOperand, ScaledMmGemm
from megads.model.linear import WeightGradSlot

# a @ b^T of two quantised operands, [M, N], FP32 (or BF16 where the FP8 kernel gives no FP32)
QuantGemm = Callable[[QOperand, QOperand], torch.Tensor]


def emulated_gemm(a: QOperand, b: QOperand) -> torch.Tensor:
    """The emulation's GEMM of quantised operands: dequantise (value x scale, FP32), then one FP32
    GEMM per 128-wide chunk of K added in K order (`chunked_mm`)."""
    a_dq = dequantize_tiles(a.q, a.scale)
    b_dq = dequantize_blocks(b.q, b.scale) if b.kind == "block" else dequantize_tiles(b.q, b.scale)
    if a_dq.shape[0] == 0:
        return a_dq.new_zeros(0, b_dq.shape[0])
    return chunked_mm(a_dq, b_dq.t())


def _tiles(x_NK: torch.Tensor, pow2: bool) -> QOperand:
    return QOperand(*quantize_tiles(x_NK, pow2=pow2), "tile")


def _blocks(w_OK: torch.Tensor, pow2: bool) -> QOperand:
    return QOperand(*quantize_blocks(w_OK, pow2=pow2), "block")


def weight_grad_q(g_NO: torch.Tensor, x_NK: torch.Tensor, *, pow2: bool, gemm: QuantGemm) -> torch.Tensor:
    """dw = g^T @ x, contracting over tokens: both in 128 x 1 tiles (128 tokens of one channel)."""
    if g_NO.shape[0] == 0:
        return g_NO.new_zeros(g_NO.shape[1], x_NK.shape[1], dtype=torch.float32)
    return gemm(_tiles(g_NO.t(), pow2), _tiles(x_NK.t(), pow2)).float()


class _Fp8QLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NK: torch.Tensor, w_OK: torch.Tensor, bias: torch.Tensor | None,  # type: ignore[override]
                pow2: bool, out_dtype: torch.dtype, slot: WeightGradSlot | None, gemm: QuantGemm) -> torch.Tensor:
        w_q = _blocks(w_OK, pow2)
        if x_NK.shape[0] == 0:
            y = x_NK.new_zeros(0, w_OK.shape[0], dtype=torch.float32)
        else:
            y = gemm(_tiles(x_NK, pow2), w_q).float()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x_NK, w_q.q, w_q.scale)
        ctx.pow2, ctx.has_bias, ctx.x_dtype, ctx.w_dtype = pow2, bias is not None, x_NK.dtype, w_OK.dtype
        ctx.slot, ctx.gemm = slot, gemm
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):  # type: ignore[override]
        x_NK, w_q, w_s = ctx.saved_tensors
        pow2, gemm = ctx.pow2, ctx.gemm
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            if g_NO.shape[0] == 0:
                grad_x = x_NK.new_zeros(x_NK.shape)
            else:
                grad_x = gemm(_tiles(g_NO, pow2), QOperand(w_q, w_s, "block").t_block()).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            w_dtype = ctx.w_dtype

            def weight_grad() -> torch.Tensor:
                return weight_grad_q(g_NO, x_NK, pow2=pow2, gemm=gemm).to(w_dtype)

            grad_w = weight_grad() if ctx.slot is None else ctx.slot.take(weight_grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_NO.float().sum(0).to(ctx.w_dtype)  # a sum, no GEMM: full precision
        return grad_x, grad_w, grad_b, None, None, None, None


def fp8_linear_q(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, gemm: QuantGemm,
                 pow2: bool = True, slot: WeightGradSlot | None = None) -> torch.Tensor:
    """`fp8_linear` (the emulation's F.linear) with its three GEMMs through `gemm`."""
    out_dtype = _out_dtype(x)
    lead = x.shape[:-1]
    with torch.autocast(x.device.type, enabled=False):  # the function does its own casts
        y = _Fp8QLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, pow2, out_dtype, slot, gemm)
    return y.view(*lead, weight.shape[0])


class _Fp8QGroupedMM(torch.autograd.Function):
    """Expert e: its contiguous rows times w[e]^T, each expert with its own scales, one `gemm` per
    expert with rows. The 1 x 128 tiles of the forward and input gradient lie inside one row, so
    all rows are quantised at once (the same values as expert by expert); the weight gradient's
    128-token tiles are quantised per expert, starting at its first row."""

    @staticmethod
    def forward(ctx, x_NK: torch.Tensor, w_EOK: torch.Tensor, counts: list[int],  # type: ignore[override]
                pow2: bool, out_dtype: torch.dtype, slot: WeightGradSlot | None, gemm: QuantGemm) -> torch.Tensor:
        x_q, x_s = quantize_tiles(x_NK, pow2=pow2)
        w_q, w_s = quantize_blocks(w_EOK, pow2=pow2)
        y = x_NK.new_empty(x_NK.shape[0], w_EOK.shape[1], dtype=out_dtype)
        for e, rows in expert_rows(counts):
            y[rows] = gemm(QOperand(x_q[rows], x_s[rows], "tile"), QOperand(w_q[e], w_s[e], "block"))
        ctx.save_for_backward(x_NK, w_q, w_s)
        ctx.counts, ctx.pow2, ctx.w_dtype, ctx.slot, ctx.gemm = counts, pow2, w_EOK.dtype, slot, gemm
        return y

    @staticmethod
    def backward(ctx, g_NO: torch.Tensor):  # type: ignore[override]
        x_NK, w_q, w_s = ctx.saved_tensors
        counts, pow2, w_dtype, gemm = ctx.counts, ctx.pow2, ctx.w_dtype, ctx.gemm
        grad_x = None
        if ctx.needs_input_grad[0]:
            g_q, g_s = quantize_tiles(g_NO, pow2=pow2)
            grad_x = x_NK.new_empty(x_NK.shape)
            for e, rows in expert_rows(counts):
                w_t = QOperand(w_q[e], w_s[e], "block").t_block()
                grad_x[rows] = gemm(QOperand(g_q[rows], g_s[rows], "tile"), w_t)

        def weight_grad() -> torch.Tensor:
            grad_w = x_NK.new_zeros(w_q.shape, dtype=w_dtype)
            for e, rows in expert_rows(counts):
                grad_w[e] = weight_grad_q(g_NO[rows], x_NK[rows], pow2=pow2, gemm=gemm)
            return grad_w

        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad() if ctx.slot is None else ctx.slot.take(weight_grad)
        return grad_x, grad_w, None, None, None, None, None


def fp8_grouped_mm_q(x_NK: torch.Tensor, w_EOK: torch.Tensor, counts: list[int], *, gemm: QuantGemm,
                     pow2: bool = True, slot: WeightGradSlot | None = None) -> torch.Tensor:
    """`fp8_grouped_mm` (one scale set per expert) with every GEMM through `gemm`."""
    out_dtype = _out_dtype(x_NK)
    with torch.autocast(x_NK.device.type, enabled=False):
        return _Fp8QGroupedMM.apply(x_NK, w_EOK, counts, pow2, out_dtype, slot, gemm)


class Fp8TorchLinear(Fp8Linear):
    """`Fp8Linear` (same parameters) whose GEMMs run through `gemm` (torch's block-wise FP8 GEMM)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, pow2: bool = True,
                 gemm: QuantGemm) -> None:
        super().__init__(in_features, out_features, bias=bias, pow2=pow2)
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_q(x, self.weight, self.bias, gemm=self.gemm, pow2=self.pow2, slot=self.wgrad_slot)


class Fp8TorchGroupedLinear(Fp8GroupedLinear):
    """`Fp8GroupedLinear` (same parameters) whose per-expert GEMMs run through `gemm`."""

    def __init__(self, num: int, in_features: int, out_features: int, *, pow2: bool = True,
                 gemm: QuantGemm) -> None:
        super().__init__(num, in_features, out_features, pow2=pow2)
        self.gemm = gemm

    def forward(self, x_NI: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert len(counts) == self.num, (len(counts), self.num)
        return fp8_grouped_mm_q(x_NI, self.weight, counts, gemm=self.gemm, pow2=self.pow2, slot=self.wgrad_slot)


class Fp8TorchFactory(Fp8Factory):
    """The `torch` FP8 backend: the emulation's factory (same modules' parameters, same FP8
    dispatch codec) with every GEMM through `gemm`; by default one `ScaledMmGemm` shared by the
    model's layers (it settles on the first block-wise API and output dtype that run)."""

    name = "fp8-torch"

    def __init__(self, *, pow2_scales: bool = True, dispatch: bool = True, gemm: QuantGemm | None = None) -> None:
        super().__init__(pow2_scales=pow2_scales, dispatch=dispatch)
        self.gemm: QuantGemm = gemm if gemm is not None else ScaledMmGemm()

    def linear(self, in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
        return Fp8TorchLinear(in_features, out_features, bias=bias, pow2=self.pow2_scales, gemm=self.gemm)

    def grouped(self, num: int, in_features: int, out_features: int) -> nn.Module:
        return Fp8TorchGroupedLinear(num, in_features, out_features, pow2=self.pow2_scales, gemm=self.gemm)
