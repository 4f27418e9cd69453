"""Forward+backward time of megads vs transformers' DeepseekV3 on identical weights, same run.

    python -m tools.bench_model [--presets tiny small] [--batch 2] [--seq 256] [--iters 5]

For each preset: a transformers `DeepseekV3ForCausalLM` is built from the preset's config
(default attention implementation, sdpa), saved, and loaded into megads with `megads.from_hf`,
so both hold the same weights. Each iteration runs loss + backward on the same batch (no MTP:
transformers' model has none), alternating the two models to share machine noise; we report
median wall and CPU seconds per iteration and the ratios megads/transformers (goal <= 0.5).
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


def build_pair(preset: str, *, seed: int):
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
    return cfg, hf.train(), ours.train()


def time_step(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(preset: str, *, batch: int, seq: int, iters: int, warmup: int = 1) -> dict[str, float]:
    cfg, hf, ours = build_pair(preset, seed=0)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]

    def run_hf() -> None:
        hf.zero_grad(set_to_none=True)
        logits = hf(x).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()

    def run_ours() -> None:
        ours.zero_grad(set_to_none=True)
        ours.compute_loss(x, y, mtp_weight=0.0).total.backward()

    for _ in range(warmup):
        run_hf()
        run_ours()
    t_hf, t_ours = [], []
    for i in range(iters):
        print(f"  {preset}: iteration {i + 1}/{iters}", flush=True)
        t_hf.append(time_step(run_hf))
        t_ours.append(time_step(run_ours))
    hf_s, ours_s = (statistics.median(t[0] for t in ts) for ts in (t_hf, t_ours))
    hf_cpu, ours_cpu = (statistics.median(t[1] for t in ts) for ts in (t_hf, t_ours))
    n_params = sum(p.numel() for p in hf.parameters())
    return {"params_M": n_params / 1e6, "transformers_s": hf_s, "megads_s": ours_s, "ratio": ours_s / hf_s,
            "transformers_cpu_s": hf_cpu, "megads_cpu_s": ours_cpu, "cpu_ratio": ours_cpu / hf_cpu,
            "experts_impl": str(hf.config._experts_implementation),
            "tokens_per_s_megads": batch * seq / ours_s, "tokens_per_s_transformers": batch * seq / hf_s}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}, "
          f"batch {args.batch} x seq {args.seq}, float32, forward+backward")
    rows = []
    for preset in args.presets:
        r = bench(preset, batch=args.batch, seq=args.seq, iters=args.iters)
        rows.append((preset, r))
    print(f"peer: transformers DeepseekV3ForCausalLM, experts_implementation={rows[0][1]['experts_impl']}, sdpa")
    print(f"{'preset':8s} {'params':>9s} {'hf wall s':>10s} {'ours wall s':>12s} {'wall ratio':>11s} "
          f"{'hf cpu s':>9s} {'ours cpu s':>11s} {'cpu ratio':>10s}")
    for preset, r in rows:
        print(f"{preset:8s} {r['params_M']:8.1f}M {r['transformers_s']:10.3f} {r['megads_s']:12.3f} {r['ratio']:11.3f} "
              f"{r['transformers_cpu_s']:9.3f} {r['megads_cpu_s']:11.3f} {r['cpu_ratio']:10.3f}")


if __name__ == "__main__":
    main()
