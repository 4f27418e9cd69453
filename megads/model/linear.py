"""The one factory through which every GEMM layer of the model is created.

A layer asks for "a linear" (or "a grouped linear" for routed experts) and the factory
decides the backend: native PyTorch here, an FP8 block-scaled backend later (Transformer
Engine on GPUs, its exact emulation on CPU). This is Megatron-Core's "spec" idea without the
global registry: the factory is an explicit argument of the model constructor.

Shapes: N rows (tokens), I input features, O output features, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]^T for contiguous row groups, without cat/stack copies.

    Outputs, input gradients and the [E, O, I] weight gradient are written in place into
    preallocated buffers, which is what a grouped-GEMM kernel does on GPUs.
    """

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        w = w_EOI.to(x_NI.dtype)
        y_NO = x_NI.new_empty(x_NI.shape[0], w.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(x_NI[start:start + n], w[e].t(), out=y_NO[start:start + n])
            start += n
        ctx.save_for_backward(x_NI, w_EOI)
        ctx.counts = counts
        return y_NO

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):  # type: ignore[override]
        x_NI, w_EOI = ctx.saved_tensors
        w = w_EOI.to(grad_NO.dtype)
        grad_NO = grad_NO.contiguous()
        grad_x = x_NI.new_empty(x_NI.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(w_EOI, dtype=grad_NO.dtype) if ctx.needs_input_grad[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if not n and grad_w is not None:
                grad_w[e].zero_()  # only experts without rows; the rest are fully overwritten
            if n:
                g = grad_NO[start:start + n]
                if grad_x is not None:
                    torch.mm(g, w[e], out=grad_x[start:start + n])
                if grad_w is not None:
                    torch.mm(g.t(), x_NI[start:start + n], out=grad_w[e])
            start += n
        if grad_w is not None:
            grad_w = grad_w.to(w_EOI.dtype)
        return grad_x, grad_w, None


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Row-grouped matmul: expert e multiplies its contiguous slice of rows by w[e]^T."""
    return _GroupedMM.apply(x_NI, w_EOI, counts)


class GroupedLinear(nn.Module):
    """E independent linears (no bias), weight [E, O, I], applied to rows grouped by expert.

    `forward(x_NI, counts)` runs expert e on rows [offset_e, offset_e + counts[e]); each expert
    runs exactly once on its contiguous slice, no masking over all tokens.
    """

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num = num
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        nn.init.kaiming_uniform_(self.weight.view(-1, in_features), a=math.sqrt(5))

    def forward(self, x_NI: torch.Tensor, counts: list[int]) -> torch.Tensor:
        assert len(counts) == self.num, (len(counts), self.num)
        return grouped_mm(x_NI, self.weight, counts)

    def extra_repr(self) -> str:
        return f"num={self.num}, in_features={self.in_features}, out_features={self.out_features}"


class LinearFactory:
    """Native PyTorch backend. Subclass and override both methods for another backend."""

    name = "native"

    def linear(self, in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def grouped(self, num: int, in_features: int, out_features: int) -> nn.Module:
        return GroupedLinear(num, in_features, out_features)
