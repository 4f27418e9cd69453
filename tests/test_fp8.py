"""The FP8 emulation against an independent reference of the stated numerics (docs/fp8.md).

The reference below is written from the description, not from megads.model.fp8: scales from a
Python loop over every tile / block (max-abs / 448, optionally the next power of two), E4M3 by
torch's cast, dequantised by a loop, then one FP32 GEMM per 128-wide K chunk added in K order.
The emulation must equal it bit for bit, forward and both gradients, on shapes that are and are
not multiples of 128. Where CPU `torch._scaled_mm` handles a case (one K block: row-wise scales
for the activations, one scale for the weights), the emulation agrees with it within FP32
rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from megads.model.fp8 import (
    E4M3_MAX,
    Fp8BackendUnavailable,
    Fp8Factory,
    Fp8GroupedLinear,
    Fp8Linear,
    choose_fp8_backend,
    fp8_grouped_mm,
    fp8_linear,
    quantize_blocks,
    quantize_tiles,
)
from megads.model.linear import Linear
from megads.model.transformer import DeepseekV3
from megads.testing.parallel import tiny_config

B = 128


def ref_fake_quant(x: torch.Tensor, tile_rows: int, tile_cols: int, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (2-D, FP32) through E4M3 with one scale per tile_rows x tile_cols tile: (values, scales)."""
    out = torch.empty_like(x)
    rows, cols = x.shape
    scales = torch.empty(-(-rows // tile_rows), -(-cols // tile_cols))
    for i in range(0, rows, tile_rows):
        for j in range(0, cols, tile_cols):
            tile = x[i:i + tile_rows, j:j + tile_cols]
            amax = tile.abs().max()  # FP32
            s = amax / E4M3_MAX if float(amax) > 0 else torch.tensor(1.0)
            if pow2 and float(amax) > 0:  # the next power of two, from the FP32 value
                s = torch.tensor(2.0 ** math.ceil(math.log2(float(s))))  # exact in double, then FP32
            scales[i // tile_rows, j // tile_cols] = s
            q = (tile / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            out[i:i + tile_rows, j:j + tile_cols] = q.float() * s
    return out, scales


def ref_gemm(a_NK: torch.Tensor, b_KM: torch.Tensor) -> torch.Tensor:
    acc = None
    for k in range(0, a_NK.shape[1], B):
        part = torch.mm(a_NK[:, k:k + B], b_KM[k:k + B])
        acc = part if acc is None else acc + part
    return acc


def ref_linear(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, pow2: bool):
    """(y, dx, dw) of y = x @ w^T under the stated numerics, upstream gradient g."""
    xq, _ = ref_fake_quant(x, 1, B, pow2)            # 1 x 128 along K
    wq, _ = ref_fake_quant(w, B, B, pow2)            # 128 x 128 blocks
    y = ref_gemm(xq, wq.t())
    gq, _ = ref_fake_quant(g, 1, B, pow2)            # 1 x 128 along O (dgrad contracts over O)
    dx = ref_gemm(gq, wq)
    g_tok, _ = ref_fake_quant(g, B, 1, pow2)         # 128 x 1: 128 tokens of one channel (wgrad)
    x_tok, _ = ref_fake_quant(x, B, 1, pow2)
    dw = ref_gemm(g_tok.t().contiguous(), x_tok)
    return y, dx, dw


SHAPES = [(5, 200, 130), (256, 256, 128), (130, 128, 300), (1, 64, 8)]


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "exact-scales"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"N{n}-K{k}-O{o}" for n, k, o in SHAPES])
def test_linear_equals_the_reference_bit_for_bit(shape: tuple[int, int, int], pow2: bool) -> None:
    n, k, o = shape
    gen = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(n, k, generator=gen) * torch.logspace(-2, 2, k)  # channels of very different sizes
    w = torch.randn(o, k, generator=gen) * 0.05
    g = torch.randn(n, o, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr, pow2=pow2)
    y.backward(g)
    ry, rdx, rdw = ref_linear(x, w, g, pow2)
    assert torch.equal(y, ry)
    assert torch.equal(xr.grad, rdx)
    assert torch.equal(wr.grad, rdw)
    assert not torch.equal(y, x @ w.t())  # it really is FP8: not the FP32 product


def test_scales_are_the_max_abs_over_448() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 300, generator=gen)
    x[2, 140] = 1000.0  # beyond E4M3's range before scaling
    _, s = quantize_tiles(x, pow2=False)
    for r in range(7):
        for t in range(3):
            assert float(s[r, t]) == pytest.approx(float(x[r, t * B:(t + 1) * B].abs().max()) / 448, rel=1e-7)
    _, s2 = quantize_tiles(x, pow2=True)
    assert torch.all(s2 >= s) and torch.all(torch.log2(s2) == torch.round(torch.log2(s2)))
    w = torch.randn(200, 260, generator=gen)
    _, sw = quantize_blocks(w, pow2=False)
    assert sw.shape == (2, 3)
    assert float(sw[1, 2]) == pytest.approx(float(w[128:, 256:].abs().max()) / 448, rel=1e-7)


def test_saturation_and_zero_tiles() -> None:
    x = torch.zeros(3, 256)
    x[0, :128] = torch.linspace(-5e4, 5e4, 128)  # a huge tile
    x[1, 5] = -3e-9                              # a tiny one
    q, s = quantize_tiles(x, pow2=False)
    assert torch.isfinite(q.float()).all()
    assert q.float()[0].abs().max() == E4M3_MAX  # the tile's max maps to 448 exactly
    assert q.float()[1].abs().max() == E4M3_MAX
    assert float(s[2, 0]) == 1.0 and float(s[0, 1]) == 1.0  # all-zero tiles: scale 1, values 0
    # a value rounding past 448 after the division saturates instead of becoming NaN
    q2, _ = quantize_tiles(torch.full((1, 128), 448.0001), pow2=False)
    assert torch.isfinite(q2.float()).all() and q2.float().max() == E4M3_MAX


@pytest.mark.parametrize("pow2", [True, False])
def test_one_k_block_agrees_with_torch_scaled_mm(pow2: bool) -> None:
    """K = 128 and O <= 128: one scale per activation row, one for the weight; CPU `_scaled_mm`
    with row-wise scales computes the same product (scaling after the FP8 GEMM, not before)."""
    gen = torch.Generator().manual_seed(11)
    x, w = torch.randn(64, 128, generator=gen) * 3, torch.randn(96, 128, generator=gen) * 0.02
    qx, sx = quantize_tiles(x, pow2=pow2)
    qw, sw = quantize_blocks(w, pow2=pow2)
    peer = torch._scaled_mm(qx, qw.t(), scale_a=sx.reshape(-1, 1), scale_b=sw.reshape(1, 1).expand(1, 96).contiguous(),
                            out_dtype=torch.float32)
    ours = fp8_linear(x, w, pow2=pow2)
    torch.testing.assert_close(ours, peer, rtol=2e-6, atol=1e-6 * float(peer.abs().max()))


def _assert_experts_equal_reference(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, counts: list[int],
                                    y: torch.Tensor, grad_x: torch.Tensor, grad_w: torch.Tensor) -> None:
    """Each expert's output and gradients equal the linear reference on its own rows, bit for bit;
    an expert without rows has a zero weight gradient."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            ry, rdx, rdw = ref_linear(x[start:start + n], w[e], g[start:start + n], True)
            assert torch.equal(y[start:start + n], ry)
            assert torch.equal(grad_x[start:start + n], rdx)
            assert torch.equal(grad_w[e], rdw)
        else:
            assert torch.equal(grad_w[e], torch.zeros_like(w[e]))
        start += n


def test_grouped_experts_use_their_own_scales() -> None:
    """Each expert's rows and weight go through the linear numerics on their own (bit for bit),
    an expert without rows gets a zero weight gradient."""
    gen = torch.Generator().manual_seed(5)
    counts = [3, 0, 140, 9]
    x = torch.randn(sum(counts), 96, generator=gen)
    w = torch.randn(4, 40, 96, generator=gen) * 0.1
    w[2] *= 50  # one expert with much larger weights: shared scales would crush the others
    g = torch.randn(sum(counts), 40, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    fp8_grouped_mm(xr, wr, counts).backward(g)
    y = fp8_grouped_mm(x, w, counts)
    _assert_experts_equal_reference(x, w, g, counts, y, xr.grad, wr.grad)


@pytest.mark.parametrize("o", [40, 42], ids=["grouped-kernel", "per-expert-loop"])
def test_grouped_experts_equal_the_reference_on_both_paths(o: int) -> None:
    """The grouped emulation runs `torch._grouped_mm` per K chunk where it can (sizes multiples
    of 8) and a loop over experts otherwise: both equal the reference bit for bit, an expert with
    more than 128 rows (two 128-token tiles in its weight gradient) and one without rows included."""
    from megads.model.fp8 import _grouped_kernel_usable

    gen = torch.Generator().manual_seed(9)
    counts = [200, 0, 7, 130, 1]
    k = 264  # three K chunks, the last one short
    x = torch.randn(sum(counts), k, generator=gen) * torch.logspace(-2, 2, k)
    w = torch.randn(len(counts), o, k, generator=gen) * 0.1
    g = torch.randn(sum(counts), o, generator=gen)
    assert _grouped_kernel_usable(x, w) == (o % 8 == 0)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_grouped_mm(xr, wr, counts)
    y.backward(g)
    _assert_experts_equal_reference(x, w, g, counts, y, xr.grad, wr.grad)


# Tensors of at least FUSED_MIN_NUMEL elements are quantised by compiled kernels on CPU; each
# case below is above that size, so these run the compiled path against the eager one.
_ = slice(None)
FUSED_CASES = {  # shape, dims, the compiled function that runs it, two whole tiles (or blocks)
    "rows-1x128": ((600, 3, 128), (2,), "_fused_rows", (0, 0, _), (1, 0, _)),  # activations, 1 x 128 along K
    "tokens-128x1": ((4, 128, 200), (1,), "_quant_dequant", (0, _, 0), (1, _, 0)),  # wgrad's 128-token tiles
    "blocks-128x128": ((3, 128, 2, 128), (-3, -1), "_fused_blocks", (0, _, 0, _), (1, _, 0, _)),  # a weight
    "expert-blocks": ((4, 1, 128, 2, 128), (-3, -1), "_fused_blocks", (1, 0, _, 1, _), (2, 0, _, 1, _)),  # experts
}
# a tile's max for which FP32 max / (max / 448) is above 448: it must saturate, not become NaN
SATURATING_MAX = 325.5022277832031


@pytest.mark.parametrize("pow2", [True, False], ids=["pow2", "exact-scales"])
@pytest.mark.parametrize("case", list(FUSED_CASES), ids=list(FUSED_CASES))
def test_compiled_quantisation_equals_the_eager_path_bit_for_bit(case: str, pow2: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled quantisation gives the eager path's bits: values across 2^-20 .. 2^20 (E4M3
    subnormals after scaling included), half of them BF16 values (which land on E4M3 rounding ties
    often), one all-zero tile, and, with exact scales, values that round past 448 after the
    division and must saturate."""
    from megads.model import fp8

    monkeypatch.delenv(fp8.EAGER_QUANT_ENV, raising=False)
    shape, dims, compiled, zero_tile, max_tile = FUSED_CASES[case]
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-20, 21, shape, generator=gen).float())
    flat = x.view(-1)
    assert flat.numel() >= fp8.FUSED_MIN_NUMEL
    flat[::2] = flat[::2].bfloat16().float()
    x[zero_tile] = 0.0
    tile = x[max_tile]
    tile.clamp_(-1.0, 1.0)[(0,) * tile.dim()] = SATURATING_MAX
    if not pow2:  # saturation is exercised: some x / scale round past 448 (pow2 scales never do)
        scale = fp8.scales_from_amax(fp8._amax(x, dims, keepdim=True), pow2=False)
        assert ((x / scale).abs() > fp8.E4M3_MAX).any()
    fused = fp8._fake_quant(x, dims, pow2)
    eager = fp8._fake_quant_eager(x, dims, pow2)
    assert fp8._compiled.get(compiled) is not None  # compiled (fullgraph: it raises otherwise) and ran
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, eager)
    assert torch.equal(fused[zero_tile], torch.zeros_like(fused[zero_tile]))
    assert not torch.equal(fused, x)  # it really is quantised


def test_linear_above_the_compile_threshold_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer big enough for the compiled quantisation (forward, input and weight gradient)
    still equals the loop reference bit for bit."""
    from megads.model import fp8

    monkeypatch.delenv(fp8.EAGER_QUANT_ENV, raising=False)
    n, k, o = 512, 256, 300  # n a multiple of 128: the weight gradient's transposed operands are not copied
    assert n * k >= fp8.FUSED_MIN_NUMEL and n * o >= fp8.FUSED_MIN_NUMEL
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(n, k, generator=gen) * torch.logspace(-3, 3, k)
    w = torch.randn(o, k, generator=gen) * 0.05
    g = torch.randn(n, o, generator=gen)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr)
    y.backward(g)
    ry, rdx, rdw = ref_linear(x, w, g, True)
    assert torch.equal(y, ry)
    assert torch.equal(xr.grad, rdx)
    assert torch.equal(wr.grad, rdw)


def test_a_failing_compile_falls_back_to_the_eager_path(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """If the compiler fails (when called, or torch.compile itself refuses), the quantisation says
    so once per compiled function and runs eagerly from then on, with the same values."""
    from megads.model import fp8

    monkeypatch.delenv(fp8.EAGER_QUANT_ENV, raising=False)

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("no C++ compiler")

    def refusing(*args: object, **kwargs: object) -> None:
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(fp8, "_compiled", {"_fused_rows": broken})
    monkeypatch.setattr(torch, "compile", refusing)
    rows, blocks = torch.randn(600, 3, 128), torch.randn(3, 128, 2, 128)
    with caplog.at_level("WARNING", logger="megads.model.fp8"):
        outs = [fp8._fake_quant(rows, (2,), True) for _ in range(2)]
        outs += [fp8._fake_quant(blocks, (-3, -1), True) for _ in range(2)]
    assert torch.equal(outs[0], fp8._fake_quant_eager(rows, (2,), True)) and torch.equal(outs[1], outs[0])
    assert torch.equal(outs[2], fp8._fake_quant_eager(blocks, (-3, -1), True)) and torch.equal(outs[3], outs[2])
    assert fp8._compiled == {"_fused_rows": None, "_fused_blocks": None}
    messages = [r.message for r in caplog.records if "compiling the quantisation" in r.message]
    assert len(messages) == 2 and "no C++ compiler" in messages[0] and "not supported" in messages[1]


def test_the_factory_makes_fp8_block_layers_and_keeps_the_rest_high_precision() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    ref = DeepseekV3(cfg)
    torch.manual_seed(0)
    model = DeepseekV3(cfg, factory=Fp8Factory())
    assert model.state_dict().keys() == ref.state_dict().keys()
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # the same parameters: checkpoints and HF conversion unchanged
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Fp8Linear", "Fp8GroupedLinear"} <= kinds
    assert not isinstance(model.lm_head, Fp8Linear) and type(model.lm_head) is Linear
    assert not any(isinstance(m, Fp8Linear) for n, m in model.named_modules() if "gate" in n and "proj" not in n)
    n_fp8 = sum(isinstance(m, (Fp8Linear, Fp8GroupedLinear)) for m in model.modules())
    n_linear = sum(type(m) is Linear for m in ref.modules())
    assert n_fp8 == n_linear - 1 + sum(type(m).__name__ == "GroupedLinear" for m in ref.modules())  # all but the head
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    a = ref.compute_loss(ids, labels, mtp_weight=0.3).total
    b = model.compute_loss(ids, labels, mtp_weight=0.3).total
    b.backward()
    assert float(a) != float(b) and abs(float(a) - float(b)) < 1e-2 * float(a)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_backend_choice_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    from megads.model.fp8 import EAGER_QUANT_ENV

    cpu = torch.device("cpu")
    factory, line = choose_fp8_backend("auto", cpu)
    assert isinstance(factory, Fp8Factory) and "FP8 backend emulated" in line and "te:" in line
    monkeypatch.setenv(EAGER_QUANT_ENV, "1")
    assert choose_fp8_backend("emulated", cpu)[1] == (
        "FP8 backend emulated (fp8.backend=emulated); quantisation eager (MEGADS_FP8_EAGER_QUANT=1)")
    monkeypatch.delenv(EAGER_QUANT_ENV)
    assert choose_fp8_backend("emulated", cpu)[1].endswith("; quantisation compiled on first use "
                                                           "(MEGADS_FP8_EAGER_QUANT=1 keeps it eager)")
    for name in ("te", "torch"):
        with pytest.raises(Fp8BackendUnavailable, match=f"fp8.backend={name} cannot run: .*CUDA"):
            choose_fp8_backend(name, cpu)
    with pytest.raises(Fp8BackendUnavailable, match="must be one of"):
        choose_fp8_backend("fp4", cpu)


def _dispatch_worker(rank: int, world: int, outdir: str) -> None:
    import torch.distributed as dist

    from megads.model.fp8 import Fp8RowCodec
    from megads.model.moe import MoE
    from megads.parallel.expert_parallel import shard_experts

    cfg = tiny_config(hidden_size=160)  # D = 160: two 1 x 128 tiles a row, the second one short
    torch.manual_seed(0)
    model = DeepseekV3(cfg, factory=Fp8Factory())
    shard_experts(model, group=dist.group.WORLD, ep_size=world, ep_rank=rank)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(2, 24, cfg.hidden_size, generator=torch.Generator().manual_seed(10 + rank))
    out = {}
    for name, codec in (("plain", None), ("fp8", Fp8RowCodec())):
        moe.dispatcher.row_codec = codec
        moe.dispatcher.reset_volume()
        routing = moe.route(x)
        d = moe.dispatch(x, routing)
        y = moe.experts_forward(d)
        out[name] = {"x_MD": d.x_MD.detach(), "y_MD": y.detach(), "bytes": moe.dispatcher.sent_bytes,
                     "rows": moe.dispatcher.sent_rows}
    torch.save(out, Path(outdir) / f"rank{rank}.pt")


def test_fp8_dispatch_moves_quantised_rows_and_changes_no_expert_output(tmp_path: Path) -> None:
    """2 gloo ranks, ep 2: the dispatch sends D + 4 * ceil(D/128) bytes a row (E4M3 values and
    FP32 scales) instead of 4 * D, the experts receive the dequantised rows, and their outputs are
    bit-identical to those of a dispatch of the unquantised rows."""
    from megads.testing.parallel import spawn

    spawn(2, _dispatch_worker, str(tmp_path))
    d = 160
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        plain, fp8 = out["plain"], out["fp8"]
        assert plain["rows"] == fp8["rows"] > 0
        assert plain["bytes"] == plain["rows"] * 4 * d
        assert fp8["bytes"] == fp8["rows"] * (d + 4 * 2)  # 168 bytes a row vs 640 in FP32 (320 in BF16)
        assert not torch.equal(plain["x_MD"], fp8["x_MD"])  # the rows really crossed in FP8 ...
        assert torch.equal(fp8["x_MD"], quantised_rows(plain["x_MD"]))  # ... as their 1 x 128 quantisation
        assert torch.equal(plain["y_MD"], fp8["y_MD"])  # and the experts' outputs do not change


def quantised_rows(x: torch.Tensor) -> torch.Tensor:
    from megads.model.fp8 import fake_quant_tiles

    return fake_quant_tiles(x, pow2=True)
