"""Forward+backward time of megads vs transformers' DeepseekV3 on identical weights, same run.

    python -m tools.bench_model [--presets tiny small] [--batch 2] [--seq 256] [--iters 5]
                                [--precision fp32|bf16] [--device cpu|cuda] [--peer-experts eager]
                                [--compile]

On one GPU (issue 2's tokens/s and MFU of `small` in bf16):
    python -m tools.bench_model --device cuda --precision bf16 --presets small --batch 8 --seq 2048

For each preset: a transformers `DeepseekV3ForCausalLM` is built from the preset's config
(default attention implementation, sdpa), saved, and loaded into megads with `megads.from_hf`,
so both hold the same weights. Each iteration runs loss + backward on the same batch (no MTP:
transformers' model has none), alternating the two models to share machine noise; we report
median wall and CPU seconds per iteration and the ratios megads/transformers (goal <= 0.5).
`--precision bf16` runs both forwards under the same `torch.autocast(bfloat16)`. `--compile`
compiles megads' blocks as `compile: true` does for one process (`apply_compile`, inductor, the
GEMMs traced in; transformers stays eager, as its users run it); the warm-up steps then include
the compilation (minutes the first time on a CPU, cached on disk afterwards).

Lower bound. The script also counts the matmul FLOPs of one megads forward+backward
(`torch.utils.flop_counter.FlopCounterMode`) and measures this machine's best GEMM rate in the
same dtype (large square `torch.mm`, best of several). FLOPs / best rate is the time of the
GEMMs alone at peak speed with every other operation free: no implementation of the same math
can beat it, so `lower bound / transformers` is the smallest megads/transformers ratio this
machine allows for the preset. The last table gives the distance to that limit, per model, in
the run's precision: wall time / lower bound (1.0 = at the limit; MFU is its inverse).

Shape bound. FLOPs / peak charges every GEMM the rate of a large square one; the model's GEMMs
are smaller (the routed experts run 64-row groups on `small`). `shape_bound_seconds` records the
GEMM and attention kernels of one megads forward+backward and replays each alone at its own
shapes and strides: the time those kernels need with all other work free. megads / shape bound
is then the framework's own overhead (elementwise work, copies, Python), separated from how fast
this machine's BLAS runs the model's shapes (shape bound / FLOP bound).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch

import megads
from tools.count_params import load_preset


def build_pair(preset: str, *, seed: int, peer_experts: str | None = None, device: str = "cpu"):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = load_preset(preset)
    hf_dict = cfg.to_hf_dict()
    hf_dict.pop("architectures", None)
    hf_dict.pop("model_type", None)
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_dict)).float()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = megads.from_hf(d, init_missing_mtp=True)
    if peer_experts:
        hf.set_experts_implementation(peer_experts)
    return cfg, hf.to(device).train(), ours.to(device).train()


CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn, device: torch.device = CPU) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, device work included."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_gemm_flops(dtype: torch.dtype, *, device: torch.device = CPU, repeats: int = 5) -> float:
    """Best matmul rate of this machine (FLOP/s) in `dtype`, over a few large square GEMMs."""
    best = 0.0
    sizes = (4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
    for n in sizes:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        torch.mm(a, b)  # warm-up (threads, packing buffers, cuBLAS heuristics)
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of `torch._grouped_mm(a, b, offs)`: the groups split the rows (2D x 3D), the
    contraction (2D x 2D, a weight gradient), or nothing (3D x 3D, batched)."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # [M, K] x [E, K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [N, M] x [M, K] -> [E, N, K]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 3:  # [E, M, K] x [E, K, N]
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[1] * a_shape[2] * b_shape[1]  # [E, M, K] x [K, N_total]


def matmul_flops(fn) -> float:
    """Matmul FLOPs of one call of `fn`, forward and backward, as a kernel needs them.

    Batched matmuls are the causal attention (scores and the weighted sum of values), which the
    math path computes in full; a causal kernel skips the masked half, so they count half.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # FlopCounterMode has no formula for torch._grouped_mm (the routed experts): without this
    # the experts' GEMMs count zero and the bound is far too low
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten._grouped_mm: grouped_mm_flops}) as counter:
        fn()
    per_op = counter.get_flop_counts()["Global"]
    batched = sum(n for op, n in per_op.items() if "bmm" in str(op) or "attention" in str(op))
    return counter.get_total_flops() - batched / 2


# the kernels the shape bound replays: GEMMs (the routed experts' grouped GEMM included) and the
# fused attention kernels, forward and backward; everything else counts as free
_KERNEL_OPS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm")


def _is_kernel(name: str) -> bool:
    return name in _KERNEL_OPS or name.startswith("_scaled_dot_product") or name.startswith("_flash_attention")


def _like(t: torch.Tensor) -> torch.Tensor:
    """A fresh tensor of t's sizes, strides and dtype (random values); integer tensors (group
    offsets) keep their values, which decide the work."""
    if not (t.is_floating_point() or t.is_complex()):
        return t.clone()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0)
    return torch.randn(extent, dtype=t.dtype, device=t.device).as_strided(t.shape, t.stride())


@dataclass
class ShapeBound:
    seconds: float  # the kernels' replay time, each charged for every call
    kernels: int  # distinct kernels (op, shapes, strides, group offsets) replayed
    calls: dict[str, int]  # calls per op name in one call of the measured function


def shape_bound_seconds(fn, device: torch.device = CPU, repeats: int = 3) -> ShapeBound:
    """The GEMM and attention kernels of one call of `fn`, each replayed
    alone at its own shapes and strides on fresh operands (best of `repeats`), times how often the
    call ran it. A limit at the model's own shapes: unlike FLOPs / peak it charges small or
    thin GEMMs (the experts' 64-row groups, K-grouped weight gradients) their real speed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: dict[tuple, list] = {}

    def key(v):
        if isinstance(v, torch.Tensor):
            vals = tuple(v.tolist()) if not v.is_floating_point() and v.numel() <= 4096 else None
            return ("T", tuple(v.shape), tuple(v.stride()), v.dtype, vals)
        if isinstance(v, (list, tuple)):
            return tuple(key(x) for x in v)
        return repr(v)

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            if _is_kernel(func.overloadpacket.__name__):
                k = (func, key(args), key(sorted(kwargs.items())))
                if k in calls:
                    calls[k][0] += 1
                else:
                    calls[k] = [1, func, args, kwargs]
            return func(*args, **kwargs)

    with Recorder():
        fn()
    total = 0.0
    for count, func, args, kwargs in calls.values():
        def fresh(v):
            if isinstance(v, torch.Tensor):
                return _like(v)
            return type(v)(fresh(x) for x in v) if isinstance(v, (list, tuple)) else v
        a, kw = fresh(args), {k: fresh(v) for k, v in kwargs.items()}
        func(*a, **kw)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            t = time.perf_counter()
            func(*a, **kw)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        total += count * best
    per_op: dict[str, int] = {}
    for count, func, _, _ in calls.values():
        per_op[func.overloadpacket.__name__] = per_op.get(func.overloadpacket.__name__, 0) + count
    return ShapeBound(total, len(calls), per_op)


def bench(
    preset: str, *, batch: int, seq: int, iters: int, precision: str = "fp32", warmup: int = 1,
    peer_experts: str | None = None, device: str = "cpu", compile_blocks: bool = False,
) -> dict[str, float]:
    dev = torch.device(device)
    cfg, hf, ours = build_pair(preset, seed=0, peer_experts=peer_experts, device=device)
    if compile_blocks:
        from megads.parallel.compile import apply_compile

        apply_compile(ours, backend="inductor", eager_gemms=False)
        warmup = max(warmup, 2)  # the first step compiles, the second may recompile (dynamic shapes)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(dev)
    x, y = ids[:, :-1], ids[:, 1:]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]

    def autocast():
        return torch.autocast(dev.type, dtype=dtype, enabled=precision != "fp32")

    def run_hf() -> None:
        hf.zero_grad(set_to_none=True)
        with autocast():
            logits = hf(x).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()

    def run_ours() -> None:
        ours.zero_grad(set_to_none=True)
        with autocast():
            loss = ours.compute_loss(x, y, mtp_weight=0.0).total
        loss.backward()

    for _ in range(warmup):
        run_hf()
        run_ours()
    t_hf, t_ours = [], []
    for i in range(iters):
        print(f"  {preset}: iteration {i + 1}/{iters}", flush=True)
        t_hf.append(time_step(run_hf, dev))
        t_ours.append(time_step(run_ours, dev))
    hf_s, ours_s = (statistics.median(t[0] for t in ts) for ts in (t_hf, t_ours))
    hf_cpu, ours_cpu = (statistics.median(t[1] for t in ts) for ts in (t_hf, t_ours))
    n_params = sum(p.numel() for p in hf.parameters())
    with torch.compiler.set_stance("force_eager"):  # the same FLOPs; the counter sees eager ops
        flops = matmul_flops(run_ours)
        shape_bound = shape_bound_seconds(run_ours, dev)
    shape_bound_s, kernels = shape_bound.seconds, shape_bound.kernels
    peak = peak_gemm_flops(dtype, device=dev)
    lower_bound_s = flops / peak
    return {
        "params_M": n_params / 1e6,
        "transformers_s": hf_s, "megads_s": ours_s, "ratio": ours_s / hf_s,
        "transformers_cpu_s": hf_cpu, "megads_cpu_s": ours_cpu, "cpu_ratio": ours_cpu / hf_cpu,
        "experts_impl": str(hf.config._experts_implementation),
        "tokens_per_s_megads": batch * seq / ours_s, "tokens_per_s_transformers": batch * seq / hf_s,
        "matmul_gflop": flops / 1e9, "peak_gflops": peak / 1e9, "lower_bound_s": lower_bound_s,
        "lower_bound_ratio": lower_bound_s / hf_s,
        "shape_bound_s": shape_bound_s, "shape_bound_kernels": kernels,
        "megads_over_shape_bound": ours_s / shape_bound_s, "transformers_over_shape_bound": hf_s / shape_bound_s,
        # distance to the limit: time / lower bound (1.0 = every non-GEMM operation free, GEMMs at peak)
        "megads_over_bound": ours_s / lower_bound_s, "transformers_over_bound": hf_s / lower_bound_s,
        # model FLOP utilisation: the matmul FLOPs over (time x measured peak); = bound / time
        "mfu_megads": lower_bound_s / ours_s, "mfu_transformers": lower_bound_s / hf_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: both models' forwards under torch.autocast(cpu, bfloat16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (one GPU; use --precision bf16 there)")
    parser.add_argument("--peer-experts", default=None,
                        help="transformers' experts_implementation (default: its own default, grouped_mm; "
                             "'eager' is its reference loop over experts)")
    parser.add_argument("--compile", action="store_true",
                        help="megads with compile: true (blocks compiled with inductor; transformers eager)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"batch {args.batch} x seq {args.seq}, {args.precision}, forward+backward"
          + (", megads compiled (compile: true)" if args.compile else ", both eager"))
    rows = []
    for preset in args.presets:
        r = bench(preset, batch=args.batch, seq=args.seq, iters=args.iters, precision=args.precision,
                  peer_experts=args.peer_experts, device=args.device, compile_blocks=args.compile)
        rows.append((preset, r))
    print(f"peer: transformers DeepseekV3ForCausalLM, experts_implementation={rows[0][1]['experts_impl']}, sdpa")
    print(f"{'preset':8s} {'params':>9s} {'hf wall s':>10s} {'ours wall s':>12s} {'wall ratio':>11s} "
          f"{'hf cpu s':>9s} {'ours cpu s':>11s} {'cpu ratio':>10s}")
    for preset, r in rows:
        print(f"{preset:8s} {r['params_M']:8.1f}M {r['transformers_s']:10.3f} {r['megads_s']:12.3f} {r['ratio']:11.3f} "
              f"{r['transformers_cpu_s']:9.3f} {r['megads_cpu_s']:11.3f} {r['cpu_ratio']:10.3f}")
    print(f"lower bound: the GEMMs alone at this machine's best {args.precision} GEMM rate ({args.device}), "
          "everything else free; MFU = matmul FLOPs / (time x that rate)")
    print(f"{'preset':8s} {'matmul GFLOP':>13s} {'best GEMM GFLOP/s':>18s} {'bound s':>8s} "
          f"{'bound/transformers':>19s} {'MFU megads':>11s} {'MFU hf':>7s} {'tokens/s megads':>16s}")
    for preset, r in rows:
        print(f"{preset:8s} {r['matmul_gflop']:13.2f} {r['peak_gflops']:18.1f} {r['lower_bound_s']:8.3f} "
              f"{r['lower_bound_ratio']:19.3f} {100 * r['mfu_megads']:10.1f}% {100 * r['mfu_transformers']:6.1f}% "
              f"{r['tokens_per_s_megads']:16.0f}")
    print(f"distance to the limit ({args.precision}): wall time / lower bound (1.0 = at the limit)")
    print(f"{'preset':8s} {'megads/bound':>13s} {'transformers/bound':>19s} {'megads/transformers':>20s}")
    for preset, r in rows:
        print(f"{preset:8s} {r['megads_over_bound']:13.2f} {r['transformers_over_bound']:19.2f} {r['ratio']:20.3f}")
    print("shape bound: megads' GEMM and attention kernels replayed alone at their own shapes (everything else "
          "free): what the kernels cost before any framework overhead")
    print(f"{'preset':8s} {'kernels':>8s} {'shape bound s':>14s} {'/ FLOP bound':>13s} {'megads/shape bound':>19s} "
          f"{'transformers/shape bound':>25s}")
    for preset, r in rows:
        print(f"{preset:8s} {r['shape_bound_kernels']:8d} {r['shape_bound_s']:14.3f} "
              f"{r['shape_bound_s'] / r['lower_bound_s']:13.2f} {r['megads_over_shape_bound']:19.2f} "
              f"{r['transformers_over_shape_bound']:25.2f}")


if __name__ == "__main__":
    main()
