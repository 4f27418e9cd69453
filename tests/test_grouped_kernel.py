"""The routed experts' grouped GEMM through `torch._grouped_mm` against the per-expert loop.

On CPU (torch 2.13, float32) the kernel gives the loop's forward and both gradients bit for bit,
experts without rows included (zero weight gradients); where the kernel cannot run (a feature
size that is not a multiple of 8, no rows) the loop runs instead.
"""

from __future__ import annotations

import pytest
import torch

from megads.model.linear import grouped_kernel_usable, grouped_mm

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")


@pytest.mark.parametrize("counts", [[3, 0, 17, 9], [0, 0, 5, 0], [40, 1, 1, 30]])
def test_kernel_equals_the_loop_bit_for_bit(counts: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(counts))
    x = torch.randn(sum(counts), 32, generator=gen)
    w = torch.randn(4, 24, 32, generator=gen)
    g = torch.randn(sum(counts), 24, generator=gen)
    assert grouped_kernel_usable(x, w)
    out = {}
    for kernel in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = grouped_mm(xr, wr, counts, kernel=kernel)
        y.backward(g)
        out[kernel] = (y.detach(), xr.grad, wr.grad)
    for a, b in zip(out[False], out[True]):
        assert torch.equal(a, b)
    for e, n in enumerate(counts):
        if n == 0:
            assert torch.equal(out[True][2][e], torch.zeros(24, 32))


def test_the_loop_runs_where_the_kernel_cannot() -> None:
    x, w = torch.randn(5, 12), torch.randn(2, 8, 12)  # 12 features: strides of 48 bytes
    assert not grouped_kernel_usable(x, w)
    assert not grouped_kernel_usable(torch.randn(0, 16), torch.randn(2, 8, 16))
    assert not grouped_kernel_usable(x.bfloat16(), w)  # bf16 on CPU: the loop
    torch.testing.assert_close(grouped_mm(x, w, [2, 3]), torch.cat([x[:2] @ w[0].t(), x[2:] @ w[1].t()]))
