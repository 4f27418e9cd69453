"""FP8 checks of `tools/gpu_check.sh` (issue 12 item 5): the emulation against the GPU's own FP8
GEMMs, FP8/BF16 GEMM speed, and the `small` model's step time and peak memory.

    python -m tools.gpu_fp8_check [--device cuda] [--out gpu_check_out] [--quick] [--budget S]
    python -m tools.gpu_fp8_check --dry-run     # CPU: the control flow, every CUDA part skipped

Each check runs on its own and records `ok`, `skipped` (with the reason: no CUDA, a torch built
with CUDA < 12.9, a torch without a block-wise FP8 GEMM, no Transformer Engine or TE saying its
block-scaling recipe is unsupported here, the time budget spent) or `failed` (with the error) in
`<out>/fp8_check.json`; the exit code is 1 if any check failed. An optional API that is missing or
refuses the call as unsupported is a skip, never a failure. The peers:

- `emulation-device-vs-cpu`: the emulation (megads.model.fp8) run on the device against the same
  call on the CPU, forward and both gradients (not bit for bit: the GPU's FP32 GEMMs sum in
  another order; bound: relative 1e-5 of the output's max, with TF32 pinned off);
- `torch-rowwise`: `torch._scaled_mm` with row-wise activation scales and one weight scale (one K
  block, K = 128), the case the CPU test covers too; FP32 output (bound 1e-5), or, where this
  build refuses FP32 output for row-wise scaling, BF16 output (bound 1e-2; `output` says which);
- `torch-blockwise`: DeepSeek's scaling (1 x 128 activation tiles, 128 x 128 weight blocks; needs
  compute capability 9.x and a torch built with CUDA >= 12.9) through
  `torch.nn.functional.scaled_mm` (its `ScalingType` member names differ by torch version, see
  `_SCALING_NAMES`) or else `torch._scaled_mm` with block-shaped scales (torch >= 2.9), BF16
  output; `api` says which ran;
- `factory-torch`: the `torch` FP8 backend (megads/model/fp8_torch.py `Fp8TorchFactory`, the
  same block-wise GEMM in all three GEMMs of a linear) against the emulated backend, `Linear` with
  bias and the routed experts' grouped linear, forward, input and weight gradient, and the weight
  gradient deferred through `WeightGradStash` against at once (bound 1e-6); skipped with
  `_torch_missing`'s reason where the backend cannot run (bound: 1e-2, see the function);
- `te-blockwise`: Transformer Engine's `te.Linear` under `te.autocast` (older TE:
  `te.fp8_autocast`) with the `Float8BlockScaling` recipe, forward and both gradients, after TE's
  own support probe;
  both against the emulation of the same product (bound: BF16 rounding, relative 1e-2 of the
  output's max: the emulation computes in FP32 and rounds once; the cosine similarity and the
  worst per-column relative difference are recorded too, not bounded);
- `gemm-speed`: BF16 `torch.mm` against the block-wise FP8 GEMM on `small`'s linear shapes (the
  operands are quantised and the scales laid out before timing: only the GEMM is timed);
- `model-step`: `small` forward + backward + AdamW step, the same batch both ways, both under
  BF16 autocast (as training runs `precision=bf16` and `precision=fp8` on CUDA): `bf16` runs
  every linear as a BF16 GEMM; `fp8_emulated` runs the linears of the blocks through the FP8
  emulation (quantise/dequantise + FP32 GEMMs, megads.model.fp8), the rest (attention core,
  norms, router, head) as in `bf16`: tokens/s and peak memory (the emulation is a reference, not
  a fast path: its time ratio says what the te/torch backends must win back, docs/fp8.md).

`--device cpu --quick` runs the same code on tiny shapes (what the test suite does; the GPU-only
checks then say `skipped`). `--dry-run` is that on CPU whatever the machine has: it also runs the
API probes (which block-wise GEMM and which TE probe this install would use) and names them in the
skip reasons.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megads.model.fp8 import BLOCK, Fp8Factory, _torch_missing, fp8_linear, quantize_blocks, quantize_tiles
from megads.model.fp8_scaled_mm import (
    SCALING_NAMES,
    UNSUPPORTED,
    BlockwiseApi,
    BlockwiseUnavailable,
    QOperand,
    blockwise_fn,
    blockwise_missing,
    cuda_version,
    scaling_type_members,
)
from megads.model.fp8_scaled_mm import blockwise_apis as _blockwise_apis


class Skip(Exception):
    """A check that cannot run here (what is missing)."""


# An error raised by an optional API that means "not supported here": a skip, not a failure
# (megads/model/fp8_scaled_mm.py, shared with the torch backend).
_UNSUPPORTED = UNSUPPORTED


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _col_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst column's max |a - b| relative to that column's max |b| (a wrong scale in a small
    column hides under `_rel` when a few large columns set the max)."""
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    return float(((a - b).abs().amax(0) / b.abs().amax(0).clamp_min(1e-30)).max())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))


_cuda_version = cuda_version


@contextlib.contextmanager
def _exact_fp32() -> Iterator[None]:
    """FP32 GEMMs in full FP32 (TF32 off in cuBLAS and cuDNN) for the bounds that assume it; the
    previous settings come back afterwards."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
           torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old[:2]
        torch.set_float32_matmul_precision(old[2])


def _operands(n: int, k: int, o: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=gen) * torch.logspace(-1, 1, k)
    w = torch.randn(o, k, generator=gen) * 0.05
    g = torch.randn(n, o, generator=gen)
    return x.to(device), w.to(device), g.to(device)


def _emulated(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xr, wr, pow2=True)
    y.backward(g)
    return y.detach(), xr.grad, wr.grad


def check_emulation_device(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("needs a CUDA device (compares the emulation on the device with the CPU)")
    shapes = [(77, 200, 130), (512, 512, 1536)] if quick else [(77, 200, 130), (2048, 512, 1536), (4096, 1536, 512)]
    worst = 0.0
    with _exact_fp32():
        for n, k, o in shapes:
            x, w, g = _operands(n, k, o, torch.device("cpu"))
            ref = _emulated(x, w, g)
            got = _emulated(x.to(device), w.to(device), g.to(device))
            worst = max(worst, *(_rel(a.cpu(), b) for a, b in zip(got, ref)))
    ok = worst < 1e-5
    return {"status": "ok" if ok else "failed", "shapes": shapes, "max_rel_diff": worst, "bound": 1e-5,
            "tf32": "off (pinned for this check)"}


def check_torch_rowwise(device: torch.device, quick: bool) -> dict:
    if not hasattr(torch, "_scaled_mm"):
        raise Skip(f"torch {torch.__version__} has no torch._scaled_mm")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise Skip(f"FP8 _scaled_mm needs compute capability 8.9+ (this GPU: {torch.cuda.get_device_capability(device)})")
    x, w, _ = _operands(256, BLOCK, 128, device, seed=1)
    qx, sx = quantize_tiles(x)
    qw, sw = quantize_blocks(w)
    scale_a = sx.reshape(-1, 1).contiguous()
    scale_b = sw.reshape(1, 1).expand(1, w.shape[0]).contiguous()
    out: dict = {"shape": [256, BLOCK, 128]}
    with _exact_fp32():
        ref = fp8_linear(x, w)
        try:
            peer = torch._scaled_mm(qx, qw.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
            out.update(output="float32", bound=1e-5)
        except RuntimeError as e:
            # Older CUDA builds route row-wise scaling to a CUTLASS kernel that was BF16-output only
            # ("Only bf16 high precision output types are supported for row-wise scaling"; cuBLAS,
            # used on sm90 with CUDA >= 12.9, takes FP32): BF16 output, BF16 rounding bound.
            if device.type != "cuda":
                raise
            out["float32_output_refused"] = f"{type(e).__name__}: {e}"[:300]
            peer = torch._scaled_mm(qx, qw.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)
            out.update(output="bfloat16 (this build refused float32 output)", bound=1e-2)
    rel = _rel(peer, ref)
    out.update(status="ok" if rel < out["bound"] else "failed", max_rel_diff=rel)
    return out


# The block-wise API resolution (ScalingType member names by torch version, `torch._scaled_mm`
# fallback), the operand padding and the scale layouts live in megads/model/fp8_scaled_mm.py: the
# torch FP8 backend calls the same code.
_SCALING_NAMES = SCALING_NAMES


def blockwise_apis() -> list[BlockwiseApi]:
    """The block-wise FP8 GEMMs this torch offers, preferred first (Skip if none)."""
    try:
        return _blockwise_apis()
    except BlockwiseUnavailable as e:
        raise Skip(str(e)) from e


def _blockwise_fn(api: BlockwiseApi, qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor,
                  sw: torch.Tensor) -> Callable[[], torch.Tensor]:
    """x @ w^T with 1 x 128 tiles for x and 128 x 128 blocks for w, BF16 output: operands padded and
    scale layouts built here, once (`megads.model.fp8_scaled_mm.blockwise_fn`); the returned
    function runs only the GEMM."""
    return blockwise_fn(api, QOperand(qx, sx, "tile"), QOperand(qw, sw, "block"), torch.bfloat16)


def _meta_probe(apis: list[BlockwiseApi]) -> list[str]:
    """Each API called on meta tensors (N, K, O = 256, 640, 768: K/128 = 5 needs the padding):
    whether this torch's shape/stride checks accept the operands and scale layouts we build. A CPU
    check of the call, not of the kernel."""
    n, k, o = 256, 640, 768
    meta = torch.device("meta")
    qx, qw = (torch.empty(r, k, dtype=torch.float8_e4m3fn, device=meta) for r in (n, o))
    sx, sw = torch.empty(n, k // BLOCK, device=meta), torch.empty(o // BLOCK, k // BLOCK, device=meta)
    said = []
    for api in apis:
        try:
            y = _blockwise_fn(api, qx, sx, qw, sw)()
            said.append(f"{api.name}: layouts accepted on meta tensors ({tuple(y.shape)}, {y.dtype})")
        except Exception as e:  # noqa: BLE001
            said.append(f"{api.name}: meta call raised {type(e).__name__}: {str(e)[:200]}")
    return said


def blockwise_ready(device: torch.device) -> list[BlockwiseApi]:
    """The block-wise GEMMs to try on `device`, or Skip with why none can run (checked up front,
    the torch backend's rule: compute capability 9.0+ and a torch built with CUDA >= 12.9)."""
    apis = blockwise_apis()
    if device.type != "cuda":
        raise Skip(f"block-wise FP8 GEMMs run on CUDA only (this torch would try, in order: {_meta_probe(apis)})")
    why = blockwise_missing(device)
    if why is not None:
        raise Skip(why)
    return apis


def _first_working(apis: list[BlockwiseApi], operands: tuple) -> tuple[BlockwiseApi, torch.Tensor, dict]:
    """The first API whose call runs on these operands, its result, and the others' errors. If none
    runs: Skip when every error says "unsupported", else the first error is raised (a failure)."""
    errors: dict = {}
    for api in apis:
        try:
            return api, _blockwise_fn(api, *operands)(), errors
        except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError) as e:
            errors[api.name] = f"{type(e).__name__}: {e}"[:400]
    if all(_UNSUPPORTED.search(m) for m in errors.values()):
        raise Skip(f"no block-wise FP8 GEMM runs here: {errors}")
    raise RuntimeError(f"every block-wise FP8 GEMM raised: {errors}")


def check_torch_blockwise(device: torch.device, quick: bool) -> dict:
    apis = blockwise_ready(device)
    shapes = [(256, 512, 768)] if quick else [(256, 512, 768), (4096, 512, 1536), (4096, 1536, 512), (4096, 512, 8192)]
    worst = {"rel": 0.0, "col_rel": 0.0, "cos_min": 1.0}
    api, errors = None, {}
    with _exact_fp32():
        for n, k, o in shapes:
            x, w, _ = _operands(n, k, o, device, seed=2)
            ops = (*quantize_tiles(x), *quantize_blocks(w))
            if api is None:
                api, peer, errors = _first_working(apis, ops)
            else:
                peer = _blockwise_fn(api, *ops)()
            ref = fp8_linear(x, w)
            worst["rel"] = max(worst["rel"], _rel(peer, ref))
            worst["col_rel"] = max(worst["col_rel"], _col_rel(peer, ref))
            worst["cos_min"] = min(worst["cos_min"], _cos(peer, ref))
    out = {"status": "ok" if worst["rel"] < 1e-2 else "failed", "api": api.name, "shapes": shapes,
           "max_rel_diff": worst["rel"], "bound": 1e-2, "worst_column_rel_diff": worst["col_rel"],
           "min_cosine": worst["cos_min"], "output": "bfloat16"}
    if errors:
        out["apis_that_raised"] = errors
    return out


def _factory_pass(layer: torch.nn.Module, x: torch.Tensor, g: torch.Tensor, *args, defer: bool = False):
    """y, dx, dw of one forward + backward of `layer` (W deferred through WeightGradStash if asked)."""
    from megads.model.linear import WeightGradStash, deferring  # noqa: PLC0415

    xr = x.clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    if defer:
        stash = WeightGradStash()
        with deferring([layer], stash):
            y = layer(xr, *args)
            y.backward(g)
        dw = stash.compute()[id(layer.weight)]
    else:
        y = layer(xr, *args)
        y.backward(g)
        dw = layer.weight.grad
    return y.detach().float(), xr.grad.float(), dw.float()


def check_factory_torch(device: torch.device, quick: bool) -> dict:
    """The torch backend (Fp8TorchFactory: torch's block-wise FP8 GEMM in all three GEMMs) against
    the emulated backend (Fp8Factory) on the device: Linear and the routed experts' grouped linear,
    forward, input and weight gradient (also deferred), random shapes that are and are not
    multiples of 128. Bound: relative 1e-2 of each output's max: the two multiply the same E4M3
    values with the same scales, so they differ by the kernel's FP32 accumulation order (~1e-6)
    and, where the build gives BF16 output only, one BF16 rounding (2^-8 = 3.9e-3); a wrong scale,
    layout or padding is an O(1) error."""
    from megads.model.fp8_torch import Fp8TorchFactory  # noqa: PLC0415

    why = _torch_missing(device)
    if why is not None:
        raise Skip(f"the torch FP8 backend cannot run here: {why}")
    gen = torch.Generator().manual_seed(5)
    dense = [(77, 200, 130), (256, 512, 768)] if quick else [(77, 200, 130), (256, 512, 768), (2048, 1536, 512),
                                                            (1000, 7168 // 4, 300)]
    grouped = [(512, 256, [0, 130, 7, 300])] if quick else [(512, 256, [0, 130, 7, 300]), (1536, 384, [64, 1, 0, 700, 259])]
    emu_f, tor_f = Fp8Factory(), Fp8TorchFactory()
    worst = {k: 0.0 for k in ("y", "dx", "dw", "dw_deferred")}
    cos = {k: 1.0 for k in ("y", "dx", "dw")}
    rows = []
    try:
        with _exact_fp32():
            cases = [("linear", (n, k, o), None) for n, k, o in dense] + \
                    [("grouped", (sum(c), k, o), c) for k, o, c in grouped]
            for kind, (n, k, o), counts in cases:
                if kind == "linear":
                    emu, tor = emu_f.linear(k, o, bias=True), tor_f.linear(k, o, bias=True)
                else:
                    emu, tor = emu_f.grouped(len(counts), k, o), tor_f.grouped(len(counts), k, o)
                tor.load_state_dict(emu.state_dict())
                emu, tor = emu.to(device), tor.to(device)
                x = (torch.randn(n, k, generator=gen) * torch.logspace(-1, 1, k)).to(device)
                g = torch.randn(n, o, generator=gen).to(device)
                args = () if counts is None else (counts,)
                ref = _factory_pass(emu, x, g, *args)
                got = _factory_pass(tor, x, g, *args)
                got_deferred = _factory_pass(tor, x, g, *args, defer=True)
                row = {"kind": kind, "shape": [n, k, o], "counts": counts}
                for name, a, b in zip(("y", "dx", "dw"), got, ref):
                    row[name] = _rel(a, b)
                    worst[name] = max(worst[name], row[name])
                    cos[name] = min(cos[name], _cos(a, b))
                row["dw_deferred_vs_at_once"] = _rel(got_deferred[2], got[2])
                worst["dw_deferred"] = max(worst["dw_deferred"], row["dw_deferred_vs_at_once"])
                rows.append(row)
    except BlockwiseUnavailable as e:
        raise Skip(f"torch's block-wise GEMM refused every call as unsupported: {e}"[:800]) from e
    ok = all(worst[k] < 1e-2 for k in ("y", "dx", "dw")) and worst["dw_deferred"] < 1e-6
    return {"status": "ok" if ok else "failed", "api": tor_f.gemm.api, "refused": tor_f.gemm.refused,
            "max_rel_diff": worst, "bound": {"y, dx, dw vs emulated": 1e-2, "dw deferred vs at once": 1e-6},
            "min_cosine": cos, "cases": rows}


def _te():
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415  (optional GPU extra)
        from transformer_engine.common.recipe import Float8BlockScaling  # noqa: PLC0415
    except Exception as e:  # ImportError, or a CUDA/ABI mismatch raised at import
        raise Skip(f"transformer_engine does not import ({type(e).__name__}: {e}); README, GPU section") from e
    return te, Float8BlockScaling


def _te_block_scaling_support(te) -> tuple[bool, str, str]:
    """TE's own answer to "does Float8BlockScaling run here": (supported, reason, which probe).
    The probe moved between TE versions; the first that exists answers:
    - newer TE (transformer_engine/pytorch/quantization.py, exported at the top level):
      `te.is_fp8_block_scaling_available(return_reason=True)`, and the module's
      `check_fp8_block_scaling_support()`;
    - older TE with block scaling (transformer_engine/pytorch/fp8.py):
      `check_fp8_block_scaling_support()` and `FP8GlobalStateManager.is_fp8_block_scaling_available()`.
    None of them: TE's rule itself (compute capability 9.x or newer and a torch built with
    CUDA >= 12.9)."""
    import importlib  # noqa: PLC0415

    probes: list[tuple[str, Callable[[], object]]] = []
    if hasattr(te, "is_fp8_block_scaling_available"):
        probes.append(("te.is_fp8_block_scaling_available",
                       lambda: te.is_fp8_block_scaling_available(return_reason=True)))
    for mod_name in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # noqa: BLE001, S112  (that TE version has no such module)
            continue
        if hasattr(mod, "check_fp8_block_scaling_support"):
            probes.append((f"{mod_name}.check_fp8_block_scaling_support", mod.check_fp8_block_scaling_support))
        mgr = getattr(mod, "FP8GlobalStateManager", None)
        if mgr is not None and hasattr(mgr, "is_fp8_block_scaling_available"):
            probes.append((f"{mod_name}.FP8GlobalStateManager.is_fp8_block_scaling_available",
                           mgr.is_fp8_block_scaling_available))
    for name, probe in probes:
        try:
            r = probe()
        except Exception:  # noqa: BLE001, S112  (a probe with another signature: try the next)
            continue
        if isinstance(r, tuple):
            return bool(r[0]), str(r[1]) if len(r) > 1 else "", name
        return bool(r), "", name
    ok = torch.cuda.get_device_capability() >= (9, 0) and (_cuda_version() or (0, 0)) >= (12, 9)
    return ok, "" if ok else f"compute capability 9.0+ and CUDA >= 12.9 needed (torch CUDA {torch.version.cuda})", \
        "none found: TE's rule (cc >= 9.0, CUDA >= 12.9)"


def _te_autocast(te, recipe):
    """`te.autocast(recipe=...)` where it exists (newer TE), else `te.fp8_autocast(fp8_recipe=...)`
    (older TE; newer ones keep it, deprecated)."""
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe), "te.autocast"
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe), "te.fp8_autocast"


def check_te_blockwise(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("Transformer Engine needs a CUDA device")
    te, recipe_cls = _te()
    te_version = getattr(te, "__version__", None)
    if te_version is None:
        with contextlib.suppress(Exception):
            import transformer_engine  # noqa: PLC0415

            te_version = transformer_engine.__version__
    supported, reason, probe = _te_block_scaling_support(te)
    if not supported:
        raise Skip(f"Transformer Engine {te_version}: Float8BlockScaling unsupported here ({probe}: {reason})")
    shapes = [(256, 512, 768)] if quick else [(256, 512, 768), (4096, 512, 1536), (4096, 1536, 512)]
    worst = {"y": 0.0, "dx": 0.0, "dw": 0.0}
    col = {"y": 0.0, "dx": 0.0, "dw": 0.0}
    cos = {"y": 1.0, "dx": 1.0, "dw": 1.0}
    ctx_name = "?"
    try:
        with _exact_fp32():
            for n, k, o in shapes:
                x, w, g = _operands(n, k, o, device, seed=3)
                lin = te.Linear(k, o, bias=False, params_dtype=torch.float32, device=device)
                with torch.no_grad():
                    lin.weight.copy_(w)
                xr = x.clone().requires_grad_()
                ctx, ctx_name = _te_autocast(te, recipe_cls())
                with ctx:
                    y = lin(xr)
                y.backward(g.to(y.dtype))
                ref = _emulated(x, w, g)
                for name, a, b in zip(("y", "dx", "dw"), (y, xr.grad, lin.weight.grad), ref):
                    worst[name] = max(worst[name], _rel(a, b))
                    col[name] = max(col[name], _col_rel(a, b))
                    cos[name] = min(cos[name], _cos(a, b))
    except (RuntimeError, AssertionError, NotImplementedError) as e:
        # The probe said yes but the recipe still refused (a TE/CUDA combination the probe does not
        # know): a skip if the message says "unsupported", else a failure.
        if _UNSUPPORTED.search(str(e)):
            raise Skip(f"Transformer Engine {te_version} refused Float8BlockScaling: {type(e).__name__}: {e}"[:600]) from e
        raise
    ok = all(v < 1e-2 for v in worst.values())
    return {"status": "ok" if ok else "failed", "shapes": shapes, "max_rel_diff": worst, "bound": 1e-2,
            "worst_column_rel_diff": col, "min_cosine": cos, "te_version": te_version, "support_probe": probe,
            "autocast": ctx_name}


def _time(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / iters


def check_gemm_speed(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("GEMM speeds are measured on the GPU")
    try:
        apis, fp8_skip = blockwise_ready(device), None
    except Skip as e:
        apis, fp8_skip = [], str(e)
    n = 2048 if quick else 16384  # tokens of one step of small at batch 8 x 2048
    shapes = [(n, 512, 1536), (n, 1536, 512), (n, 512, 8192)]
    rows, api = [], None
    for t, k, o in shapes:
        x, w, _ = _operands(t, k, o, device, seed=4)
        xb, wb = x.bfloat16(), w.bfloat16()
        row: dict = {"shape": [t, k, o], "bf16_ms": 1e3 * _time(lambda a=xb, b=wb: a @ b.t(), device, 20)}
        if fp8_skip is None:
            ops = (*quantize_tiles(x), *quantize_blocks(w))
            try:
                if api is None:
                    api, _, _ = _first_working(apis, ops)
                fn = _blockwise_fn(api, *ops)  # quantised operands and scale layouts built here, not timed
                row["torch_fp8_ms"] = 1e3 * _time(fn, device, 20)
                row["torch_fp8_over_bf16"] = row["torch_fp8_ms"] / row["bf16_ms"]
            except Skip as e:
                fp8_skip = str(e)
            except Exception as e:  # noqa: BLE001
                row["torch_fp8"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    out = {"status": "ok", "rows": rows, "fp8_api": api.name if api else None,
           "note": "operands quantised and scales laid out before timing; only the GEMM is timed"}
    if fp8_skip is not None:
        out["torch_fp8"] = f"skipped: {fp8_skip}"
    return out


MODEL_STEP_RUNS = {
    "bf16": "megads DeepseekV3, native linears, forward+backward under torch.autocast(bfloat16), AdamW",
    "fp8_emulated": "megads DeepseekV3, the blocks' linears through the FP8 emulation (Fp8Factory: "
                    "quantise/dequantise + FP32 GEMMs, BF16 output), the rest as in bf16, under "
                    "torch.autocast(bfloat16), AdamW (what precision=fp8 runs on CUDA)",
}


def _model_step(cfg, name: str, batch: int, seq: int, device: torch.device, iters: int) -> dict:
    """Seconds of one forward + backward + AdamW step of the model (MODEL_STEP_RUNS[name]), under
    BF16 autocast both ways."""
    from megads.model.transformer import DeepseekV3  # noqa: PLC0415

    torch.manual_seed(0)
    model = DeepseekV3(cfg, factory=Fp8Factory() if name.startswith("fp8") else None).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.3).total
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = _time(step, device, iters)
    row = {"runs": MODEL_STEP_RUNS[name], "batch": batch, "seq": seq, "step_s": s, "tokens_per_s": batch * seq / s}
    if device.type == "cuda":
        row["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def check_model_step(device: torch.device, quick: bool) -> dict:
    from tools.count_params import load_preset  # noqa: PLC0415

    preset = "tiny" if quick else "small"
    cfg = load_preset(preset)
    seq, iters = (64, 2) if quick else (2048, 5)
    # The same batch both ways; on CUDA out of memory, both again at half the batch.
    batches = [2] if quick else [4, 2, 1]
    out: dict = {"status": "ok", "preset": preset}
    for batch in batches:
        try:
            for name in ("bf16", "fp8_emulated"):
                out[name] = _model_step(cfg, name, batch, seq, device, iters)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            break
        except torch.cuda.OutOfMemoryError as e:
            out.pop("bf16", None)
            out.setdefault("out_of_memory", []).append(f"batch {batch}: {str(e)[:200]}")
            torch.cuda.empty_cache()
    else:
        raise Skip(f"out of memory at every batch of {batches} x {seq}: {out.get('out_of_memory')}")
    out["fp8_emulated_over_bf16_time_per_token"] = out["bf16"]["tokens_per_s"] / out["fp8_emulated"]["tokens_per_s"]
    out["note"] = ("same batch and autocast both ways; the ratio is what the emulation's quantise/dequantise "
                   "and FP32 GEMMs cost over BF16 GEMMs (bench_model part 1 has bf16 at batch 8)")
    return out


CHECKS: dict[str, Callable[[torch.device, bool], dict]] = {
    "emulation-device-vs-cpu": check_emulation_device,
    "torch-rowwise": check_torch_rowwise,
    "torch-blockwise": check_torch_blockwise,
    "factory-torch": check_factory_torch,
    "te-blockwise": check_te_blockwise,
    "gemm-speed": check_gemm_speed,
    "model-step": check_model_step,
}

# What --dry-run leaves out although it could run on the CPU (too slow for a quick control-flow run).
DRY_RUN_SKIPS = {"model-step": "the step timings are a GPU measurement (tiny on the CPU: --device cpu --quick)"}


def _env(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda,
           "scaling_type_members": scaling_type_members(),
           "has_F_scaled_mm": hasattr(torch.nn.functional, "scaled_mm"),
           "has_torch__scaled_mm": hasattr(torch, "_scaled_mm"),
           "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision(),
                    "note": "as found; the accuracy checks pin TF32 off while they run"}}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke test)")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, tiny shapes: the control flow and API probes, every CUDA part skipped with its reason")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for all checks: a check that would start after them is skipped (not failed)")
    ap.add_argument("--only", nargs="*", default=None, help=f"a subset of {list(CHECKS)}")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.device, args.quick = "cpu", True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_fp8_check: --device cuda but torch.cuda.is_available() is False")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"env": {**_env(device), "dry_run": args.dry_run}}
    t_start = time.perf_counter()
    for name, fn in CHECKS.items():
        if args.only is not None and name not in args.only:
            continue
        t = time.perf_counter()
        try:
            if args.dry_run and name in DRY_RUN_SKIPS:
                raise Skip(f"dry run: {DRY_RUN_SKIPS[name]}")
            if args.budget is not None and t - t_start > args.budget:
                raise Skip(f"time budget of {args.budget:.0f} s spent before this check")
            r = fn(device, args.quick)
        except Skip as e:
            r = {"status": "skipped", "why": str(e)}
        except Exception as e:  # noqa: BLE001  (one failing check must not hide the others)
            r = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000], "trace": traceback.format_exc()[-3000:]}
        r["seconds"] = round(time.perf_counter() - t, 2)
        results[name] = r
        brief = {k: v for k, v in r.items() if k != "trace"}
        print(f"[gpu_fp8_check] {name}: {json.dumps(brief)}", flush=True)
        (args.out / "fp8_check.json").write_text(json.dumps(results, indent=1) + "\n")
    failed = [n for n, r in results.items() if isinstance(r, dict) and r.get("status") == "failed"]
    print(f"[gpu_fp8_check] {'FAILED: ' + ', '.join(failed) if failed else 'no check failed'}; "
          f"results in {args.out / 'fp8_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
