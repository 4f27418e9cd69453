"""Optimizer-path overhead: one training step through megads.parallel vs plain torch AdamW.

    .venv/bin/python -m tools.bench_optimizer --model small --device cuda     (the issue's figure)
    .venv/bin/python -m tools.bench_optimizer --model tiny --device cpu       (runs anywhere)

Both sides run the same model (conf/model/<name>.yaml), the same micro-batches and the same
forward/backward; they differ in the optimizer path:
  ours  ParallelExecutor on a 1-rank mesh: pipeline runtime (pp = 1), ZeRO-1 flat buffers
        (gradient copy into FP32 buckets, clipping, AdamW on the flat shard, copy back)
  peer  model.compute_loss + backward, clip_grad_norm_, torch.optim.AdamW(fused=True) (the fused
        kernel exists on CUDA and on CPU)
Prints the median step time of each and the overhead (ours / peer - 1); the issue's goal is
< 5% on a GPU. Bf16 autocast on CUDA for both, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megads.model.balance import update_expert_bias
from megads.model.config import ModelConfig
from megads.model.transformer import DeepseekV3
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.testing.parallel import free_port, make_batches

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    args = ap.parse_args()
    raw = yaml.safe_load((CONF / f"{args.model}.yaml").read_text())
    raw = {k: v for k, v in raw.items() if k in ModelConfig.__dataclass_fields__}
    cfg = ModelConfig(**raw)
    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    batches = make_batches(cfg, steps=args.steps, global_batch=args.batch, seq_len=args.seq_len)
    optim = OptimSettings(lr=1e-4, weight_decay=0.1, max_grad_norm=1.0, bias_update_speed=1e-3)
    mbs = args.micro_batch_size

    # ours
    plan = plan_layout(world_size=1, pp=1, ep=1, num_layers=cfg.num_hidden_layers, n_routed_experts=cfg.n_routed_experts)
    ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, micro_batch_size=mbs, seed=0, optim=optim,
                          device=device, autocast_dtype=autocast)
    # peer
    torch.manual_seed(0)
    model = DeepseekV3(cfg).to(device)
    kw = {"fused": True}  # torch's fused AdamW kernel exists on CUDA and on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                            weight_decay=optim.weight_decay, **kw)

    def ours_step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        ex.step(ids, labels, mtp_weight=0.3)

    def peer_step(ids: torch.Tensor, labels: torch.Tensor) -> None:
        n = ids.shape[0] // mbs
        for i in range(0, ids.shape[0], mbs):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = model.compute_loss(ids[i : i + mbs], labels[i : i + mbs], mtp_weight=0.3)
            (out.total / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, gamma=optim.bias_update_speed)

    # alternate the two so that machine noise hits both alike
    ours, peer = [], []
    for ids, labels in batches:
        ids, labels = ids.to(device), labels.to(device)
        for fn, times in ((ours_step, ours), (peer_step, peer)):
            _sync(device)
            t0 = time.perf_counter()
            fn(ids, labels)
            _sync(device)
            times.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    o, p = statistics.median(ours[1:]), statistics.median(peer[1:])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"model {args.model}, {name}, {args.batch} x {args.seq_len} tokens/step, micro-batch {mbs}, "
          f"median of {args.steps - 1} steps after a warm-up")
    print(f"ours (ParallelExecutor, ZeRO-1 path): {o * 1e3:8.1f} ms/step")
    print(f"peer (torch AdamW fused):             {p * 1e3:8.1f} ms/step")
    print(f"overhead ours/peer - 1 = {100 * (o / p - 1):+.1f}%")


if __name__ == "__main__":
    main()
