"""Forward+backward time of megads vs transformers' DeepseekV3 on identical weights, same run.

    python -m tools.bench_model [--presets tiny small] [--batch 2] [--seq 256] [--iters 5]
                                [--precision fp32|bf16] [--device cpu|cuda] [--peer-experts eager]

On one GPU (issue 2's tokens/s and MFU of `small` in bf16):
    python -m tools.bench_model --device cuda --precision bf16 --presets small --batch 8 --seq 2048

For each preset: a transformers `DeepseekV3ForCausalLM` is built from the preset's config
(default attention implementation, sdpa), saved, and loaded into megads with `megads.from_hf`,
so both hold the same weights. Each iteration runs loss + backward on the same batch (no MTP:
transformers' model has none), alternating the two models to share machine noise; we report
median wall and CPU seconds per iteration and the ratios megads/transformers (goal <= 0.5).
`--precision bf16` runs both forwards under the same `torch.autocast(bfloat16)`.

Lower bound. The script also counts the matmul FLOPs of one megads forward+backward
(`torch.utils.flop_counter.FlopCounterMode`) and measures this machine's best GEMM rate in the
same dtype (large square `torch.mm`, best of several). FLOPs / best rate is the time of the
GEMMs alone at peak speed with every other operation free: no implementation of the same math
can beat it, so `lower bound / transformers` is the smallest megads/transformers ratio this
machine allows for the preset. The last table gives the distance to that limit, per model, in
the run's precision: wall time / lower bound (1.0 = at the limit; MFU is its inverse).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings

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


def bench(
    preset: str, *, batch: int, seq: int, iters: int, precision: str = "fp32", warmup: int = 1,
    peer_experts: str | None = None, device: str = "cpu",
) -> dict[str, float]:
    dev = torch.device(device)
    cfg, hf, ours = build_pair(preset, seed=0, peer_experts=peer_experts, device=device)
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
    flops = matmul_flops(run_ours)
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
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"batch {args.batch} x seq {args.seq}, {args.precision}, forward+backward")
    rows = []
    for preset in args.presets:
        r = bench(preset, batch=args.batch, seq=args.seq, iters=args.iters, precision=args.precision,
                  peer_experts=args.peer_experts, device=args.device)
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


if __name__ == "__main__":
    main()
