"""FP8 checks of `tools/gpu_check.sh` (issue 12 item 5): the emulation against the GPU's own FP8
GEMMs, FP8/BF16 GEMM speed, and the `small` model's step time and peak memory.

    python -m tools.gpu_fp8_check [--device cuda] [--out gpu_check_out] [--quick]

Each check runs on its own and records `ok`, `skipped` (with what is missing: no CUDA, no
Transformer Engine, a torch without block-wise `scaled_mm`) or `failed` (with the error) in
`<out>/fp8_check.json`; the exit code is 1 if any check failed. The peers:

- `emulation-device-vs-cpu`: the emulation (megads.model.fp8) run on the device against the same
  call on the CPU, forward and both gradients (not bit for bit: the GPU's FP32 GEMMs sum in
  another order; bound: relative 1e-5 of the output's max);
- `torch-rowwise`: `torch._scaled_mm` with row-wise activation scales and one weight scale (one K
  block, K = 128), the case the CPU test covers too;
- `torch-blockwise`: `torch.nn.functional.scaled_mm` with DeepSeek's scaling (1 x 128 activation
  tiles, 128 x 128 weight blocks; cuBLAS 12.9+ on compute capability 9.x), BF16 output;
- `te-blockwise`: Transformer Engine's `te.Linear` under `fp8_autocast` with the
  `Float8BlockScaling` recipe, forward and both gradients;
  both against the emulation of the same product (bound: BF16 rounding, relative 1e-2 of the
  output's max: the emulation computes in FP32 and rounds once);
- `gemm-speed`: BF16 `torch.mm` against the block-wise FP8 GEMMs on `small`'s linear shapes;
- `model-step`: `small` forward + backward + AdamW step in BF16 autocast and with the FP8
  emulation: tokens/s and peak memory (the emulation is a reference, not a fast path: its
  FP8/BF16 ratio says what the te/torch backends must win back, docs/fp8.md).

`--device cpu --quick` runs the same code on tiny shapes (what the test suite does; the GPU-only
checks then say `skipped`).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from megads.model.fp8 import BLOCK, Fp8Factory, fp8_linear, quantize_blocks, quantize_tiles


class Skip(Exception):
    """A check that cannot run here (what is missing)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


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
    for n, k, o in shapes:
        x, w, g = _operands(n, k, o, torch.device("cpu"))
        ref = _emulated(x, w, g)
        got = _emulated(x.to(device), w.to(device), g.to(device))
        worst = max(worst, *(_rel(a.cpu(), b) for a, b in zip(got, ref)))
    ok = worst < 1e-5
    return {"status": "ok" if ok else "failed", "shapes": shapes, "max_rel_diff": worst, "bound": 1e-5}


def check_torch_rowwise(device: torch.device, quick: bool) -> dict:
    if not hasattr(torch, "_scaled_mm"):
        raise Skip("this torch has no torch._scaled_mm")
    x, w, _ = _operands(256, BLOCK, 128, device, seed=1)
    qx, sx = quantize_tiles(x)
    qw, sw = quantize_blocks(w)
    peer = torch._scaled_mm(qx, qw.t(), scale_a=sx.reshape(-1, 1).contiguous(),
                            scale_b=sw.reshape(1, 1).expand(1, w.shape[0]).contiguous(), out_dtype=torch.float32)
    rel = _rel(peer, fp8_linear(x, w))
    return {"status": "ok" if rel < 1e-5 else "failed", "max_rel_diff": rel, "bound": 1e-5, "shape": [256, BLOCK, 128]}


def _blockwise_mm(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """x @ w^T through `F.scaled_mm` with 1 x 128 tiles for x and 128 x 128 blocks for w (the
    layouts torch's own tests use: scales outer-dimension-major, w's block scales padded to a
    multiple of 4 along K)."""
    import torch.nn.functional as F  # noqa: N812, PLC0415

    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        raise Skip(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm with ScalingType")
    kb = sx.shape[1]
    l4 = -(-kb // 4) * 4
    sw_pad = torch.nn.functional.pad(sw, (0, l4 - kb))  # [O/128, L4]
    scale_a = sx.t().contiguous().t()  # [N, K/128], outer-dimension-major
    scale_b = sw_pad.t()                # [L4, O/128]
    return F.scaled_mm(qx, qw.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, F.ScalingType.BlockWise128x128,
                       output_dtype=torch.bfloat16)


def check_torch_blockwise(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("block-wise scaled_mm runs on CUDA only")
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        raise Skip(f"block-wise scaled_mm needs compute capability 9.x (this GPU: {major}.{minor})")
    shapes = [(256, 512, 768)] if quick else [(256, 512, 768), (4096, 512, 1536), (4096, 1536, 512), (4096, 512, 8192)]
    worst = 0.0
    for n, k, o in shapes:
        x, w, _ = _operands(n, k, o, device, seed=2)
        qx, sx = quantize_tiles(x)
        qw, sw = quantize_blocks(w)
        peer = _blockwise_mm(qx, sx, qw, sw)
        worst = max(worst, _rel(peer, fp8_linear(x, w)))
    return {"status": "ok" if worst < 1e-2 else "failed", "shapes": shapes, "max_rel_diff": worst, "bound": 1e-2,
            "output": "bfloat16"}


def _te():
    try:
        import transformer_engine.pytorch as te  # noqa: PLC0415  (optional GPU extra)
        from transformer_engine.common.recipe import Float8BlockScaling  # noqa: PLC0415
    except Exception as e:  # ImportError, or a CUDA/ABI mismatch raised at import
        raise Skip(f"transformer_engine does not import ({type(e).__name__}: {e}); README, GPU section") from e
    return te, Float8BlockScaling


def check_te_blockwise(device: torch.device, quick: bool) -> dict:
    if device.type != "cuda":
        raise Skip("Transformer Engine needs a CUDA device")
    te, recipe_cls = _te()
    shapes = [(256, 512, 768)] if quick else [(256, 512, 768), (4096, 512, 1536), (4096, 1536, 512)]
    worst = {"y": 0.0, "dx": 0.0, "dw": 0.0}
    for n, k, o in shapes:
        x, w, g = _operands(n, k, o, device, seed=3)
        lin = te.Linear(k, o, bias=False, params_dtype=torch.float32, device=device)
        with torch.no_grad():
            lin.weight.copy_(w)
        xr = x.clone().requires_grad_()
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe_cls()):
            y = lin(xr)
        y.backward(g.to(y.dtype))
        ref = _emulated(x, w, g)
        for name, a, b in zip(("y", "dx", "dw"), (y, xr.grad, lin.weight.grad), ref):
            worst[name] = max(worst[name], _rel(a, b))
    ok = all(v < 1e-2 for v in worst.values())
    return {"status": "ok" if ok else "failed", "shapes": shapes, "max_rel_diff": worst, "bound": 1e-2,
            "te_version": getattr(te, "__version__", "?")}


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
    n = 2048 if quick else 16384  # tokens of one step of small at batch 8 x 2048
    shapes = [(n, 512, 1536), (n, 1536, 512), (n, 512, 8192)]
    rows = []
    for t, k, o in shapes:
        x, w, _ = _operands(t, k, o, device, seed=4)
        xb, wb = x.bfloat16(), w.bfloat16()
        row = {"shape": [t, k, o], "bf16_ms": 1e3 * _time(lambda a=xb, b=wb: a @ b.t(), device, 20)}
        q = (*quantize_tiles(x), *quantize_blocks(w))
        try:
            row["torch_fp8_ms"] = 1e3 * _time(lambda q=q: _blockwise_mm(*q), device, 20)
            row["torch_fp8_over_bf16"] = row["torch_fp8_ms"] / row["bf16_ms"]
        except Exception as e:  # noqa: BLE001
            row["torch_fp8"] = f"{type(e).__name__}: {e}"[:300]
        rows.append(row)
    return {"status": "ok", "rows": rows, "note": "operands already quantised; the quantisation is not timed"}


def _model_step(cfg, name: str, batch: int, seq: int, device: torch.device, iters: int) -> dict:
    """Seconds of one forward + backward + AdamW step of the model (BF16 autocast or the FP8 emulation)."""
    from megads.model.transformer import DeepseekV3  # noqa: PLC0415

    torch.manual_seed(0)
    model = DeepseekV3(cfg, factory=Fp8Factory() if name.startswith("fp8") else None).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            loss = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.3).total
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    s = _time(step, device, iters)
    row = {"batch": batch, "seq": seq, "step_s": s, "tokens_per_s": batch * seq / s}
    if device.type == "cuda":
        row["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row


def check_model_step(device: torch.device, quick: bool) -> dict:
    from tools.count_params import load_preset  # noqa: PLC0415

    preset = "tiny" if quick else "small"
    cfg = load_preset(preset)
    out: dict = {"status": "ok", "preset": preset}
    for name, batch in (("bf16", 2 if quick else 8), ("fp8_emulated", 2)):
        out[name] = _model_step(cfg, name, batch, 64 if quick else 2048, device, 2 if quick else 5)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["fp8_emulated_over_bf16_time_per_token"] = out["bf16"]["tokens_per_s"] / out["fp8_emulated"]["tokens_per_s"]
    return out


CHECKS: dict[str, Callable[[torch.device, bool], dict]] = {
    "emulation-device-vs-cpu": check_emulation_device,
    "torch-rowwise": check_torch_rowwise,
    "torch-blockwise": check_torch_blockwise,
    "te-blockwise": check_te_blockwise,
    "gemm-speed": check_gemm_speed,
    "model-step": check_model_step,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the CPU smoke test)")
    ap.add_argument("--only", nargs="*", default=None, help=f"a subset of {list(CHECKS)}")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_fp8_check: --device cuda but torch.cuda.is_available() is False")
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "device": str(device), "cuda": torch.version.cuda}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    results: dict = {"env": env}
    for name, fn in CHECKS.items():
        if args.only is not None and name not in args.only:
            continue
        t = time.perf_counter()
        try:
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
