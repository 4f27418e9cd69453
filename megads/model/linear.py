"""The one factory through which every GEMM layer of the model is created.

A layer asks for "a linear" (or "a grouped linear" for routed experts) and the factory
decides the backend: native PyTorch here, an FP8 block-scaled backend later (Transformer
Engine on GPUs, its exact emulation on CPU). This is Megatron-Core's "spec" idea without the
global registry: the factory is an explicit argument of the model constructor.

Shapes: N rows (tokens), I input features, O output features, E experts.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, overload

import torch
from torch import nn


class WeightGradStash:
    """The B of a B/W split: weight gradients of GEMM layers, deferred to W.

    During B (`deferring(layers, stash)`) each GEMM layer's backward computes its input gradient
    and hands the stash a closure over what its weight gradient needs (its input and output
    gradient); W (`compute`) runs the closures: one GEMM per use of a layer, no walk of the graph.
    """

    def __init__(self) -> None:
        self._work: list[tuple[nn.Module, Callable[[], torch.Tensor]]] = []

    def defer(self, layer: nn.Module, compute: Callable[[], torch.Tensor]) -> None:
        self._work.append((layer, compute))

    def __len__(self) -> int:
        return len(self._work)

    def compute(self) -> dict[int, torch.Tensor]:
        """id(layer.weight) -> its gradient (in the weight's dtype), summed over the layer's uses in
        the order B met them."""
        out: dict[int, torch.Tensor] = {}
        # no graph: the stashed operands are activations that require grad, and outside the
        # autograd engine (which runs B's backward functions without grad mode) each GEMM would
        # record a node and keep its operands alive with the gradient it returns
        with torch.no_grad():
            for layer, fn in self._work:
                key, g = id(layer.weight), fn().to(layer.weight.dtype)
                out[key] = g if key not in out else out[key].add_(g)
        self._work.clear()
        return out


class WeightGradSlot:
    """Where one GEMM layer's backward sends its weight gradient: `stash` None = compute it at once.

    Holds its layer weakly (the layer owns the slot); the layer's `weight` is read only in W, so
    parameters replaced after construction (meta materialisation, expert sharding) are the ones
    that get the gradient."""

    __slots__ = ("_layer", "stash")

    def __init__(self, layer: nn.Module) -> None:
        self._layer = weakref.ref(layer)
        self.stash: WeightGradStash | None = None

    def take(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """The weight gradient now, or None after handing `compute` to the stash."""
        if self.stash is None:
            return compute()
        layer = self._layer()
        assert layer is not None
        self.stash.defer(layer, compute)
        return None


def deferrable_layers(module: nn.Module) -> list[nn.Module]:
    """The GEMM layers under `module` whose weight gradients a B/W split can defer."""
    return [m for m in module.modules() if isinstance(getattr(m, "wgrad_slot", None), WeightGradSlot)]


@contextmanager
def deferring(layers: Sequence[nn.Module], stash: WeightGradStash) -> Iterator[WeightGradStash]:
    """While active, the backward of `layers` defers their weight gradients to `stash`."""
    for m in layers:
        m.wgrad_slot.stash = stash
    try:
        yield stash
    finally:
        for m in layers:
            m.wgrad_slot.stash = None


class _LinearFn(torch.autograd.Function):
    """F.linear with the weight gradient that can be deferred (`WeightGradSlot`). Inputs arrive
    in the GEMM dtype (`linear` casts, as autocast would); the gradients are autograd's for
    F.linear: dx = g W, dW = g^T x, db = sum g."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,  # type: ignore[override]
                slot: WeightGradSlot) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.slot, ctx.has_bias = slot, b is not None
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = g.matmul(w)
        g2 = g.reshape(-1, g.shape[-1])
        if ctx.needs_input_grad[1]:
            x2 = x.reshape(-1, x.shape[-1])
            # in w's dtype (the GEMM's), as autograd gives it; the cast of an autocast copy back to
            # the master weight's dtype is the cast's backward (or WeightGradStash.compute in W)
            grad_w = ctx.slot.take(lambda: g2.t().mm(x2))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None


class Linear(nn.Linear):
    """nn.Linear whose weight gradient a B/W split can defer (`WeightGradSlot`); the same
    parameters, forward and gradients as nn.Linear otherwise."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.wgrad_slot = WeightGradSlot(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_autocast_dtype(x)
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return _LinearFn.apply(x, w, b, self.wgrad_slot)


class GroupCounts(Sequence[int]):
    """Rows per group (expert) of a grouped GEMM, kept on the device; read to the host lazily.

    The grouped-GEMM kernel only needs the group offsets, which stay on the device
    (`offsets_G`); the per-expert loop (the fallback and the reference) needs Python ints, which
    the first `host` read gets (one device-to-host copy, a host synchronisation on a GPU) and
    caches, so the two GEMMs of an expert MLP and their backward share one read. A dispatcher
    that already has the counts on the host (the expert-parallel one, after its split-size
    exchange) passes them in and no read ever happens. A plain list of ints works wherever a
    `GroupCounts` does (`as_group_counts`).

    Shapes: G groups.
    """

    __slots__ = ("_dev_G", "_host", "_offs_G")

    def __init__(self, counts_G: torch.Tensor | None = None, *, host: list[int] | None = None) -> None:
        if counts_G is None and host is None:
            raise ValueError("GroupCounts needs the counts on the device or on the host")
        self._dev_G = counts_G
        self._host = host
        self._offs_G: dict[torch.device, torch.Tensor] = {}

    def device_counts(self, device: torch.device) -> torch.Tensor:
        """The counts as an int64 tensor on `device` (host counts are copied there, not read back)."""
        if self._dev_G is None:
            assert self._host is not None
            self._dev_G = torch.tensor(self._host, dtype=torch.long, device=device)
        return self._dev_G.to(device)

    def offsets_G(self, device: torch.device) -> torch.Tensor:
        """End offset of every group, int32 on `device` (what `torch._grouped_mm` takes)."""
        if device not in self._offs_G:
            self._offs_G[device] = self.device_counts(device).cumsum(0).to(torch.int32)
        return self._offs_G[device]

    @property
    def host(self) -> list[int]:
        """The counts as Python ints: one read of the device counts the first time, then cached."""
        if self._host is None:
            assert self._dev_G is not None
            self._host = self._dev_G.tolist()
        return self._host

    def __len__(self) -> int:  # no read: the number of groups is a shape
        return len(self._host) if self._host is not None else int(self._dev_G.shape[0])  # type: ignore[union-attr]

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: int | slice) -> int | list[int]:
        return self.host[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self.host)

    def __repr__(self) -> str:
        return f"GroupCounts({self._host if self._host is not None else self._dev_G})"


def as_group_counts(counts: Sequence[int]) -> GroupCounts:
    return counts if isinstance(counts, GroupCounts) else GroupCounts(host=list(counts))


class _GroupedMM(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ w[e]^T for contiguous row groups, without cat/stack copies.

    Outputs, input gradients and the [E, O, I] weight gradient are written in place into
    preallocated buffers, which is what a grouped-GEMM kernel does on GPUs. When x is in a lower
    precision than w (autocast), each expert's weight is cast on its own just before its GEMM:
    casting the whole [E, O, I] stack at once costs a large fresh allocation per call.
    """

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EOI: torch.Tensor, groups: GroupCounts,  # type: ignore[override]
                slot: WeightGradSlot | None = None) -> torch.Tensor:
        counts = groups.host  # the loop needs Python ints: the layer's one host read (cached on `groups`)
        y_NO = x_NI.new_empty(x_NI.shape[0], w_EOI.shape[1])
        cast = w_EOI.dtype != x_NI.dtype
        w_cast: list[torch.Tensor] = []  # the low-precision weights, kept for backward as F.linear does
        start = 0
        for e, n in enumerate(counts):
            if n:
                w_OI = w_EOI[e].to(x_NI.dtype)
                if cast:
                    w_cast.append(w_OI)
                torch.mm(x_NI[start:start + n], w_OI.t(), out=y_NO[start:start + n])
            start += n
        ctx.save_for_backward(x_NI, w_EOI, *w_cast)
        ctx.counts, ctx.slot = counts, slot
        return y_NO

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):  # type: ignore[override]
        x_NI, w_EOI, *w_cast = ctx.saved_tensors
        grad_NO = grad_NO.contiguous().to(x_NI.dtype)
        counts = ctx.counts
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = x_NI.new_empty(x_NI.shape)
            cast_iter = iter(w_cast)
            start = 0
            for e, n in enumerate(counts):
                if n:
                    w_OI = next(cast_iter) if w_cast else w_EOI[e]
                    torch.mm(grad_NO[start:start + n], w_OI, out=grad_x[start:start + n])
                start += n

        def weight_grad() -> torch.Tensor:
            grad_w = torch.empty_like(w_EOI)
            start = 0
            for e, n in enumerate(counts):
                if not n:
                    grad_w[e].zero_()  # only experts without rows; the rest are fully overwritten
                elif not w_cast:
                    torch.mm(grad_NO[start:start + n].t(), x_NI[start:start + n], out=grad_w[e])
                else:
                    grad_w[e].copy_(torch.mm(grad_NO[start:start + n].t(), x_NI[start:start + n]))
                start += n
            return grad_w

        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad() if ctx.slot is None else ctx.slot.take(weight_grad)
        return grad_x, grad_w, None, None


def grouped_kernel_usable(x_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` can run this grouped GEMM: present in this torch, float32 on
    CPU or bfloat16 on a compute capability 9.0+ GPU, feature sizes multiples of 8 (its operands'
    strides must be multiples of 16 bytes), at least one row. Otherwise the per-expert loop runs."""
    if not hasattr(torch, "_grouped_mm") or x_NI.shape[0] == 0:
        return False
    if w_EOI.shape[1] % 8 or w_EOI.shape[2] % 8:
        return False
    if x_NI.device.type == "cpu":
        return x_NI.dtype == torch.float32 and w_EOI.dtype == torch.float32
    if x_NI.device.type == "cuda":
        return x_NI.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_NI.device)[0] >= 9
    return False


class _GroupedKernelMM(torch.autograd.Function):
    """The same product as `_GroupedMM` in three `torch._grouped_mm` calls (forward, input and
    weight gradient), no Python loop over experts; the group offsets are made on the device from
    the counts, which are never read back to the host. A weight stack in another dtype than x
    (bf16 autocast over FP32 master weights) is cast once per call."""

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EOI: torch.Tensor, groups: GroupCounts,  # type: ignore[override]
                slot: WeightGradSlot | None = None) -> torch.Tensor:
        offs = groups.offsets_G(x_NI.device)
        w_low = w_EOI if w_EOI.dtype == x_NI.dtype else w_EOI.to(x_NI.dtype)
        ctx.save_for_backward(x_NI, w_low, offs)
        ctx.w_dtype, ctx.slot = w_EOI.dtype, slot
        return torch._grouped_mm(x_NI, w_low.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad_NO: torch.Tensor):  # type: ignore[override]
        x_NI, w_low, offs = ctx.saved_tensors
        grad_NO = grad_NO.contiguous().to(x_NI.dtype)
        grad_x = torch._grouped_mm(grad_NO, w_low, offs=offs) if ctx.needs_input_grad[0] else None
        w_dtype = ctx.w_dtype

        def weight_grad() -> torch.Tensor:  # experts without rows get zeros
            return torch._grouped_mm(grad_NO.t(), x_NI, offs=offs).to(w_dtype)

        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad() if ctx.slot is None else ctx.slot.take(weight_grad)
        return grad_x, grad_w, None, None


def to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """x in the dtype autocast would give a GEMM input on x's device (x itself outside autocast)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return x.to(torch.get_autocast_dtype(device_type))
    return x


def grouped_mm(x_NI: torch.Tensor, w_EOI: torch.Tensor, counts: Sequence[int], *, kernel: bool | None = None,
               slot: WeightGradSlot | None = None) -> torch.Tensor:
    """Row-grouped matmul: expert e multiplies its contiguous slice of rows by w[e]^T.

    `counts`: rows per expert, a list or a `GroupCounts` (device counts: the kernel path then
    never synchronises with the host; the loop reads them once).

    `kernel`: run `torch._grouped_mm` (True), the per-expert loop (False, the reference), or the
    kernel where `grouped_kernel_usable` says it can (None).

    Under autocast the GEMMs run in the autocast dtype, as `F.linear` does: a custom autograd
    Function is invisible to autocast, so without this cast the routed experts (most of a MoE
    model's FLOPs) would silently stay in float32 inside a bf16 run. Weight gradients come back
    in the weight's dtype.
    """
    x_NI = to_autocast_dtype(x_NI)
    if kernel is None:
        kernel = grouped_kernel_usable(x_NI, w_EOI)
    # the weights are cast inside; autocast must not cast them again
    with torch.autocast(x_NI.device.type, enabled=False):
        return (_GroupedKernelMM if kernel else _GroupedMM).apply(x_NI, w_EOI, as_group_counts(counts), slot)


class GroupedLinear(nn.Module):
    """E independent linears (no bias), weight [E, O, I], applied to rows grouped by expert.

    `forward(x_NI, counts)` runs expert e on rows [offset_e, offset_e + counts[e]); each expert
    runs exactly once on its contiguous slice, no masking over all tokens.
    """

    def __init__(self, num: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.num = num
        self.first_index = 0  # global index of row 0 (an expert-parallel shard holds rows [first, first + num))
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num, out_features, in_features))
        nn.init.kaiming_uniform_(self.weight.view(-1, in_features), a=math.sqrt(5))
        self.wgrad_slot = WeightGradSlot(self)

    def forward(self, x_NI: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
        assert len(counts) == self.num, (len(counts), self.num)
        return grouped_mm(x_NI, self.weight, counts, slot=self.wgrad_slot)

    def extra_repr(self) -> str:
        return f"num={self.num}, in_features={self.in_features}, out_features={self.out_features}"


class LinearFactory:
    """Native PyTorch backend. Subclass and override both methods for another backend."""

    name = "native"

    def linear(self, in_features: int, out_features: int, *, bias: bool = False) -> nn.Module:
        return Linear(in_features, out_features, bias=bias)

    def grouped(self, num: int, in_features: int, out_features: int) -> nn.Module:
        return GroupedLinear(num, in_features, out_features)

    def dispatch_codec(self) -> Any:
        """How the rows entering the routed experts cross an expert-parallel all-to-all
        (`megads.parallel.expert_parallel.RowCodec`); None: as they are."""
        return None
