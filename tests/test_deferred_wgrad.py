"""Deferred weight gradients (the B/W split's W without a second walk of the graph).

Inside `deferring(layers, stash)` the backward of every GEMM layer computes its input gradient
and stashes its weight gradient's inputs; `stash.compute()` then gives exactly the weight
gradients a plain backward gives (bit for bit: the same GEMM on the same tensors), for the
native, grouped (loop and `_grouped_mm`) and FP8 layers and the whole tiny model with MTP.
"""

from __future__ import annotations

import pytest
import torch

from megads.model.fp8 import Fp8Factory
from megads.model.linear import WeightGradStash, deferrable_layers, deferring
from megads.model.transformer import DeepseekV3
from megads.testing.parallel import tiny_config


@pytest.mark.parametrize("factory", [None, Fp8Factory()], ids=["native", "fp8"])
def test_b_then_w_equals_one_backward(factory) -> None:  # noqa: ANN001
    cfg = tiny_config()
    torch.manual_seed(0)
    model = DeepseekV3(cfg, factory=factory)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    layers = deferrable_layers(model)
    gemm_ids = {id(m.weight) for m in layers}
    others = [p for p in model.parameters() if id(p) not in gemm_ids]
    kinds = {type(m).__name__ for m in layers}
    assert {"Linear", "GroupedLinear"} <= kinds or {"Fp8Linear", "Fp8GroupedLinear", "Linear"} <= kinds, kinds

    model.compute_loss(ids, labels, mtp_weight=0.3).total.backward()
    full = {id(p): p.grad.clone() for p in model.parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    out = model.compute_loss(ids, labels, mtp_weight=0.3).total
    stash = WeightGradStash()
    with deferring(layers, stash):
        b_grads = torch.autograd.grad(out, others, allow_unused=True)
    assert all(p.grad is None for p in model.parameters())  # B wrote nothing into .grad
    assert len(stash) >= len(layers) - 1  # every GEMM layer used stashed (the MTP head use included)
    assert all(m.wgrad_slot.stash is None for m in layers)  # the context is gone after B
    w_grads = stash.compute()
    for p, g in zip(others, b_grads):
        if g is not None:
            assert torch.equal(g, full[id(p)])
    for m in layers:
        if id(m.weight) in full:
            assert torch.equal(w_grads[id(m.weight)], full[id(m.weight)]), type(m).__name__


def test_under_bf16_autocast_w_gives_the_weight_gradient_of_one_backward() -> None:
    """A Linear under autocast multiplies a bf16 copy of its FP32 weight: B then W must give the
    FP32 gradient one backward gives (the bf16 GEMM result cast once), not a second rounding."""
    from megads.model.linear import Linear

    torch.manual_seed(0)
    layer = Linear(64, 48)
    x = torch.randn(2, 10, 64)
    g = torch.randn(2, 10, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g)
    full = layer.weight.grad.clone()
    assert full.dtype == torch.float32
    layer.weight.grad = None
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xr)
    stash = WeightGradStash()
    with deferring([layer], stash):
        torch.autograd.grad(y, [xr], g)
    w = stash.compute()[id(layer.weight)]
    assert w.dtype == torch.float32 and torch.equal(w, full)
