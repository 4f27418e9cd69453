"""`tools.bench_model`'s lower bound counts the routed experts' grouped GEMM like the per-expert loop.

FlopCounterMode has no formula for `torch._grouped_mm`; without `grouped_mm_flops` the experts
(most of a MoE model's FLOPs) would count zero and the bound would be far too low.
"""

from __future__ import annotations

import pytest
import torch

from megads.model.linear import grouped_mm
from tools.bench_model import matmul_flops

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")


def test_grouped_kernel_counts_the_loops_flops() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(4, 16, 32, requires_grad=True)
    counts = [10, 0, 30, 24]
    flops = {k: matmul_flops(lambda k=k: grouped_mm(x, w, counts, kernel=k).sum().backward()) for k in (False, True)}
    assert flops[False] == 3 * 2 * 64 * 32 * 16  # forward, input and weight gradient
    assert flops[True] == flops[False]


def test_shape_bound_replays_each_distinct_kernel_once_and_charges_every_call() -> None:
    from tools.bench_model import shape_bound_seconds

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x, w = torch.randn(64, 32), torch.randn(4, 32, 16)
    offs = torch.tensor([10, 10, 40, 64], dtype=torch.int32)

    def work() -> None:
        for _ in range(3):
            a @ b  # one distinct kernel, charged three times
        a.t() @ b  # other strides: another kernel
        torch._grouped_mm(x, w, offs=offs)
        torch.relu(a)  # not a kernel of the bound: free

    bound = shape_bound_seconds(work, repeats=2)
    assert bound.kernels == 3 and bound.calls == {"mm": 4, "_grouped_mm": 1}
    assert bound.seconds > 0
