"""The `torch` FP8 backend on a machine without a GPU (megads/model/fp8_torch.py, fp8_scaled_mm.py).

- the operand padding and scale layouts it passes to each block-wise API of this torch pass
  torch's own shape/stride checks on meta tensors, for the three GEMMs of a linear, on shapes that
  are and are not multiples of 128;
- its autograd functions, with the FP8 GEMM replaced through their `gemm` argument by the
  emulation's dequantise-and-multiply GEMM, equal the emulated backend bit for bit: forward, input
  gradient, weight gradient (at once and deferred through WeightGradStash), dense and grouped;
- `choose_fp8_backend` refuses `fp8.backend=torch` on the CPU with the reason.
"""

from __future__ import annotations

import pytest
import torch

from megads.model.fp8 import (
    Fp8BackendUnavailable,
    Fp8Factory,
    choose_fp8_backend,
    quantize_blocks,
    quantize_tiles,
)
from megads.model.fp8_scaled_mm import (
    BlockwiseUnavailable,
    QOperand,
    ScaledMmGemm,
    blockwise_apis,
    blockwise_fn,
    blockwise_missing,
)
from megads.model.fp8_torch import Fp8TorchFactory, Fp8TorchGroupedLinear, Fp8TorchLinear, emulated_gemm
from megads.model.linear import WeightGradStash, deferring

E4M3 = torch.float8_e4m3fn
SHAPES = [(5, 200, 130), (256, 256, 128), (130, 128, 300), (1, 64, 8), (64, 384, 200)]  # N, K, O


def _meta_operands(n: int, k: int, o: int) -> dict[str, tuple[QOperand, QOperand, tuple[int, int]]]:
    """The operands of the forward, input-gradient and weight-gradient GEMMs of an N-K-O linear,
    as the backend builds them (quantised on CPU, then moved to meta), with the result's shape."""
    x, w, g = torch.randn(n, k), torch.randn(o, k), torch.randn(n, o)
    ops = {
        "forward": (QOperand(*quantize_tiles(x), "tile"), QOperand(*quantize_blocks(w), "block"), (n, o)),
        "input_grad": (QOperand(*quantize_tiles(g), "tile"), QOperand(*quantize_blocks(w), "block").t_block(), (n, k)),
        "weight_grad": (QOperand(*quantize_tiles(g.t()), "tile"), QOperand(*quantize_tiles(x.t()), "tile"), (o, k)),
    }

    def meta(op: QOperand) -> QOperand:
        return QOperand(torch.empty_strided(op.q.shape, op.q.stride(), dtype=E4M3, device="meta"),
                        torch.empty_strided(op.scale.shape, op.scale.stride(), device="meta"), op.kind)

    return {name: (meta(a), meta(b), shape) for name, (a, b, shape) in ops.items()}


@pytest.mark.parametrize("n,k,o", SHAPES)
def test_padding_and_scale_layouts_pass_torchs_checks_on_meta(n: int, k: int, o: int) -> None:
    apis = blockwise_apis()
    assert any(a.recipes is not None for a in apis) == hasattr(torch.nn.functional, "scaled_mm")
    for api in apis:
        for name, (a, b, shape) in _meta_operands(n, k, o).items():
            y = blockwise_fn(api, a, b, torch.float32)()  # meta tensors: torch's checks run (as on CUDA)
            assert tuple(y.shape) == shape and y.dtype == torch.float32, (api.name, name)


def test_meta_checks_do_refuse_unpadded_operands() -> None:
    """The meta checks are not vacuous: K = 200 unpadded (not a multiple of 16) and a 128 x 128
    operand with O = 130 rows unpadded are refused."""
    api = blockwise_apis()[0]
    qa = torch.empty(8, 200, dtype=E4M3, device="meta")
    qb = torch.empty(130, 200, dtype=E4M3, device="meta")
    sa = torch.empty(2, 8, device="meta").t()
    sb = torch.empty(2, 4, device="meta").t() if api.recipes is not None else torch.empty(2, 2, device="meta").t()
    with pytest.raises(RuntimeError):
        if api.recipes is None:
            torch._scaled_mm(qa, qb.t(), sa, sb, out_dtype=torch.float32)
        else:
            torch.nn.functional.scaled_mm(qa, qb.t(), sa, api.recipes[0], sb, api.recipes[1],
                                          output_dtype=torch.float32)


def _run(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, *args, defer: bool) -> tuple[torch.Tensor, ...]:
    xr = x.clone().requires_grad_()
    if defer:
        stash = WeightGradStash()
        with deferring([layer], stash):
            y = layer(xr, *args)
            y.backward(g)
        assert layer.weight.grad is None and len(stash) == 1
        dw = stash.compute()[id(layer.weight)]
    else:
        y = layer(xr, *args)
        y.backward(g)
        dw = layer.weight.grad
    return y.detach(), xr.grad, dw


@pytest.mark.parametrize("pow2", [True, False])
@pytest.mark.parametrize("defer", [False, True])
def test_torch_backend_with_the_emulated_gemm_equals_the_emulation_linear(pow2: bool, defer: bool) -> None:
    emu, tor = Fp8Factory(pow2_scales=pow2), Fp8TorchFactory(pow2_scales=pow2, gemm=emulated_gemm)
    gen = torch.Generator().manual_seed(0)
    for n, k, o in SHAPES:
        a, b = emu.linear(k, o, bias=True), tor.linear(k, o, bias=True)
        assert isinstance(b, Fp8TorchLinear) and b.gemm is emulated_gemm
        b.load_state_dict(a.state_dict())  # the same parameters: checkpoints do not change
        x = torch.randn(n, k, generator=gen) * torch.logspace(-2, 2, k)
        g = torch.randn(n, o, generator=gen)
        for ra, rb in zip(_run(a, x, g, defer=defer), _run(b, x, g, defer=defer)):
            assert torch.equal(ra, rb), (n, k, o)


@pytest.mark.parametrize("defer", [False, True])
def test_torch_backend_with_the_emulated_gemm_equals_the_emulation_grouped(defer: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    # multiples of 8 (the emulation then runs torch._grouped_mm on CPU) and odd sizes (its loop);
    # an expert without rows, one with 50x larger weights, one with more than 128 rows
    for (k, o), counts in [((256, 128), [0, 130, 7, 3]), ((200, 72), [5, 0, 1, 260])]:
        emu, tor = Fp8Factory().grouped(len(counts), k, o), Fp8TorchFactory(gemm=emulated_gemm).grouped(len(counts), k, o)
        assert isinstance(tor, Fp8TorchGroupedLinear)
        with torch.no_grad():
            emu.weight.mul_(torch.tensor([1.0, 50.0, 1.0, 1.0]).view(-1, 1, 1))
        tor.load_state_dict(emu.state_dict())
        x = torch.randn(sum(counts), k, generator=gen)
        g = torch.randn(sum(counts), o, generator=gen)
        for ra, rb in zip(_run(emu, x, g, counts, defer=defer), _run(tor, x, g, counts, defer=defer)):
            assert torch.equal(ra, rb), (k, o, counts)


def test_torch_backend_under_autocast() -> None:
    """BF16 autocast (the GPU's mode: BF16 output)."""
    emu, tor = Fp8Factory().linear(200, 136), Fp8TorchFactory(gemm=emulated_gemm).linear(200, 136)
    tor.load_state_dict(emu.state_dict())
    x = torch.randn(3, 7, 200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = emu(x), tor(x)
    assert yb.dtype == torch.bfloat16 and torch.equal(ya, yb)


def test_torch_backend_refused_on_cpu_with_the_reason() -> None:
    cpu = torch.device("cpu")
    why = blockwise_missing(cpu)
    assert why is not None and "CUDA" in why
    with pytest.raises(Fp8BackendUnavailable, match=r"fp8.backend=torch cannot run: block-wise scaled_mm runs on CUDA"):
        choose_fp8_backend("torch", cpu)
    factory, line = choose_fp8_backend("auto", cpu)
    assert type(factory) is Fp8Factory and f"torch: {why}" in line
    # the torch GEMM itself, asked on CPU tensors, refuses rather than computing something else
    x, w = torch.randn(4, 128), torch.randn(128, 128)
    with pytest.raises(BlockwiseUnavailable, match="CUDA devices only"):
        ScaledMmGemm()(QOperand(*quantize_tiles(x), "tile"), QOperand(*quantize_blocks(w), "block"))


def test_auto_picks_torch_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where `_torch_missing` says nothing is missing (a sm90+ GPU with CUDA >= 12.9), `auto` and
    `torch` give the torch factory (te is not wired, so never chosen); simulated on the CPU by
    stubbing megads' own availability probe, not torch."""
    import megads.model.fp8 as fp8

    monkeypatch.setattr(fp8, "_torch_missing", lambda device: None)
    for requested in ("auto", "torch"):
        factory, line = choose_fp8_backend(requested, torch.device("cpu"), pow2_scales=False, dispatch=False)
        assert type(factory) is Fp8TorchFactory and isinstance(factory.gemm, ScaledMmGemm)
        assert not factory.pow2_scales and factory.dispatch_codec() is None
        assert line.startswith(f"FP8 backend torch (fp8.backend={requested}")
