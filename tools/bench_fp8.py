"""Cost of the FP8 emulation against FP32 GEMMs, on `small`'s shapes, same run.

    python -m tools.bench_fp8 [--iters 7] [--threads 1] [--baseline-rev REV] [--model small]

Forward + backward (all three GEMMs) of one dense linear (128 tokens, 512 -> 1536, the dense
MLP's up projection at micro-batch 2 x 64) and of the routed experts' grouped linear (512 rows
over 32 experts, 512 -> 256), each as:
- `fp32`: the native layers' products (`F.linear`, `megads.model.linear.grouped_mm`);
- `fp8`: the emulation of this checkout (megads.model.fp8), its quantisation compiled on CPU;
- `fp8-eager`: the same with `MEGADS_FP8_EAGER_QUANT=1` (every quantisation pass eager), checked
  bit-identical to `fp8`;
- `fp8@REV` (with `--baseline-rev`): megads/model/fp8.py as of git revision REV, loaded from
  `git show`, to measure a change of the emulation; its results are checked to be bit-identical.
`--model PRESET` adds a whole forward + backward of that model (batch 4 x 64, MTP on) in FP32,
FP8 and FP8 with eager quantisation. Alternating, median of `--iters`; printed: wall and CPU milliseconds (CPU time: the steadier on
a shared machine) and the ratios to FP32.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from unittest import mock

import torch

import megads.model.fp8 as fp8_now
from megads.model.linear import grouped_mm


def load_rev(rev: str) -> ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:megads/model/fp8.py"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "fp8_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("fp8_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fp8_baseline"] = mod
    spec.loader.exec_module(mod)
    return mod


def eager_quant() -> contextlib.AbstractContextManager:
    """The emulation with every quantisation pass eager (`MEGADS_FP8_EAGER_QUANT=1`)."""
    return mock.patch.dict(os.environ, {fp8_now.EAGER_QUANT_ENV: "1"})


def e_run(env: Callable[[], contextlib.AbstractContextManager], fn, *args):  # noqa: ANN001, ANN201
    with env():
        return fn(*args)


def model_cases(preset: str) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """fp32 / fp8 / fp8-eager forward + backward of `preset` (same weights, batch 4 x 64, MTP on);
    the outputs compared are the loss and the first parameters' gradients."""
    from megads.model.transformer import DeepseekV3
    from tools.count_params import load_preset

    cfg = load_preset(preset)
    models = {"fp32": DeepseekV3(cfg, init_seed=0).train(),
              "fp8": DeepseekV3(cfg, factory=fp8_now.Fp8Factory(), init_seed=0).train()}
    ids = torch.randint(0, cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(1))

    def step(model: torch.nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = model.compute_loss(ids[:, :-1], ids[:, 1:], mtp_weight=0.3).total
        loss.backward()
        return [loss.detach()] + [p.grad for p in list(model.parameters())[:8] if p.grad is not None]

    return {"fp32": lambda: step(models["fp32"]), "fp8": lambda: step(models["fp8"]),
            "fp8-eager": lambda: e_run(eager_quant, step, models["fp8"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--baseline-rev", default=None)
    ap.add_argument("--model", default=None, help="also time a forward + backward of this preset")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    counts = torch.distributions.Multinomial(512, torch.ones(32)).sample().long().tolist()
    x_g, w_g, g_g = torch.randn(512, 512, generator=gen), torch.randn(32, 256, 512, generator=gen) * 0.05, \
        torch.randn(512, 256, generator=gen)
    x_l, w_l, g_l = torch.randn(128, 512, generator=gen), torch.randn(1536, 512, generator=gen) * 0.05, \
        torch.randn(128, 1536, generator=gen)

    def run(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x, w, g) -> list[torch.Tensor]:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xr, wr)
        y.backward(g)
        return [y.detach(), xr.grad, wr.grad]

    impls: dict[str, ModuleType | None] = {"fp32": None, "fp8": fp8_now, "fp8-eager": fp8_now}
    if args.baseline_rev:
        impls[f"fp8@{args.baseline_rev}"] = load_rev(args.baseline_rev)
    cases: dict[str, dict[str, Callable[[], list[torch.Tensor]]]] = {"linear": {}, "grouped": {}}
    for name, mod in impls.items():
        if mod is None:
            cases["linear"][name] = lambda: run(torch.nn.functional.linear, x_l, w_l, g_l)
            cases["grouped"][name] = lambda: run(lambda x, w: grouped_mm(x, w, counts), x_g, w_g, g_g)
        else:
            env = eager_quant if name == "fp8-eager" else contextlib.nullcontext
            cases["linear"][name] = lambda m=mod, e=env: e_run(e, run, m.fp8_linear, x_l, w_l, g_l)
            cases["grouped"][name] = lambda m=mod, e=env: e_run(
                e, run, lambda x, w: m.fp8_grouped_mm(x, w, counts), x_g, w_g, g_g)
    if args.model:
        cases[args.model] = model_cases(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.iters}, forward + backward")
    for case, fns in cases.items():
        wall: dict[str, list[float]] = {n: [] for n in fns}
        cpu: dict[str, list[float]] = {n: [] for n in fns}
        outs: dict[str, list[torch.Tensor]] = {}
        for i in range(args.iters + 1):
            for name, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                outs[name] = fn()
                if i:
                    wall[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
        for name in fns:
            if name.startswith("fp8@") or name == "fp8-eager":
                assert all(torch.equal(a, b) for a, b in zip(outs[name], outs["fp8"])), f"{name} differs from fp8"
        med_w = {n: statistics.median(v) for n, v in wall.items()}
        med_c = {n: statistics.median(v) for n, v in cpu.items()}
        print(f"{case:8s} " + "; ".join(
            f"{n}: {1e3 * med_w[n]:.1f} ms wall, {1e3 * med_c[n]:.1f} ms CPU ({med_c[n] / med_c['fp32']:.2f}x fp32)"
            for n in fns))


if __name__ == "__main__":
    main()
