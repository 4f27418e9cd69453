"""F&B overlap of the DeepSeek stage with real gloo all-to-alls: overlapped pair vs F then B.

Two gloo ranks, ep = 2, pp = 1, a small DeepSeek model (dense first layer, MoE layers, MTP).
`DeepseekStage(overlap=True)` holds one chunk; each timed iteration runs the forward of micro-batch 1
and the full backward of micro-batch 0, either one after the other (the peer: `forward` then
`backward_full`) or as one F&B action (`forward_backward_overlapped`, sub-steps interleaved at
the all-to-alls). Both ranks start each timed region at a barrier; the figure is the median
over iterations of the slower rank.

`--latency-ms L` adds a network latency to every all-to-all (dispatch, combine and their
backward): the real gloo exchange runs, and its handle completes no earlier than L after the
issue. That models a link slower than this machine's loopback while the compute stays real;
with L = 0 only the real gloo exchange over loopback is timed. Expected: sequential ~ C + A,
overlapped -> max(C, A), where C is the pair's compute (sequential time at L = 0) and A the
summed latency of its all-to-alls (4 per MoE block per pair).

    .venv/bin/python -m tools.bench_overlap --latency-ms 0 10 --iters 10

`--pipeline` times whole DualPipeV steps instead (4 ranks, pp 2 x ep 2, `ParallelExecutor(overlap_fb=True)`),
against the same segmented stage whose F&B runs F then B, with the same added latency.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megads.pipeline.schedules import build_schedule
from megads.pipeline.stage import BackwardArgs, ForwardArgs

from megads.model.config import ModelConfig
from megads.parallel.executor import ParallelExecutor
from megads.parallel.expert_parallel import AllToAllDispatcher, moe_modules, shard_experts
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.parallel.stages import DeepseekStage, build_stage_model, piece_specs
from megads.testing.parallel import spawn


def bench_config(*, hidden: int, layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=1024, num_nextn_predict_layers=1, initializer_range=0.02,
        seq_aux_loss_alpha=0.001,
    )


class _Delayed:
    """A handle that completes no earlier than `latency_s` after its issue (and after the real work)."""

    def __init__(self, inner: Any, latency_s: float) -> None:
        self.inner = inner
        self.deadline = time.perf_counter() + latency_s

    def wait(self) -> Any:
        out = self.inner.wait()
        left = self.deadline - time.perf_counter()
        if left > 0:
            time.sleep(left)
        return out


def _add_latency(dispatchers: list[AllToAllDispatcher], latency: dict[str, float]) -> None:
    """Delay every all-to-all handle the stage uses (the dispatcher's forward and backward starts)
    by `latency["s"]` seconds (read at each issue)."""
    for d in dispatchers:
        for name in ("dispatch_start", "combine_start", "dispatch_backward_start", "combine_backward_start"):
            orig = getattr(d, name)

            def delayed(*a: Any, _orig: Any = orig, **k: Any) -> Any:
                h = _orig(*a, **k)
                h.pending = _Delayed(h.pending, latency["s"])
                return h

            setattr(d, name, delayed)


def worker(rank: int, world: int, args: dict[str, Any], outpath: str) -> None:
    cfg = bench_config(hidden=args["hidden"], layers=args["layers"])
    sched = build_schedule("1f1b", pp=1, num_microbatches=2)
    specs = piece_specs([cfg.num_hidden_layers])
    model = build_stage_model(cfg, specs=specs, seed=0)
    shard_experts(model, group=None, ep_size=world, ep_rank=rank)
    model.train()
    stage = DeepseekStage(
        model, layout=sched.layout, rank=0, specs=specs, pp_group=None, mtp_weight=0.3, grad_scale=1.0 / world,
        overlap=True,
    )
    # a second peer at L = 0 only: the unsegmented DeepseekStage (its backward all-to-alls run
    # inside autograd, where no latency can be added), to show what the segmentation costs
    plain_model = build_stage_model(cfg, specs=specs, seed=0)
    shard_experts(plain_model, group=None, ep_size=world, ep_rank=rank)
    plain_model.train()
    plain = DeepseekStage(
        plain_model, layout=sched.layout, rank=0, specs=specs, pp_group=None, mtp_weight=0.3, grad_scale=1.0 / world
    )
    g = torch.Generator().manual_seed(100 + rank)
    mbs = []
    for _ in range(2):
        tok = torch.randint(0, cfg.vocab_size, (args["batch"], args["seq"] + 1), generator=g)
        mbs.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    grad_y = torch.tensor(0.5)
    dispatchers = [m.dispatcher for m in moe_modules(model) if isinstance(m.dispatcher, AllToAllDispatcher)]
    n_moe = len(dispatchers)
    rows: list[dict[str, Any]] = []
    latency = {"s": 0.0}
    _add_latency(dispatchers, latency)
    # every iteration runs every (latency, mode) once, so load changes on the shared machine
    # hit all of them alike; the first iteration warms up
    times: dict[tuple[float, str], list[float]] = {
        (lat, mode): [] for lat in args["latencies"] for mode in ("sequential", "overlapped", "plain")
    }
    for it in range(args["iters"] + 1):
        for latency_ms in args["latencies"]:
            latency["s"] = latency_ms / 1000.0
            for mode in ("sequential", "overlapped", "plain"):
                if mode == "plain" and latency_ms:
                    continue
                st = plain if mode == "plain" else stage
                st.begin_step(microbatches=mbs, num_microbatches=2)
                st.forward(0, 0, None)
                dist.barrier()
                t0 = time.perf_counter()
                if mode == "overlapped":
                    st.forward_backward_overlapped(ForwardArgs(0, 1, None), BackwardArgs(0, 0, grad_y))
                else:
                    st.forward(0, 1, None)
                    st.backward_full(0, 0, grad_y)
                dt = torch.tensor([time.perf_counter() - t0])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                st.backward_full(0, 1, grad_y)
                st.end_step()
                st.model.zero_grad(set_to_none=True)
                if it:
                    times[(latency_ms, mode)].append(float(dt))
        if rank == 0 and it:
            print(f"iteration {it}/{args['iters']}", flush=True)
    for latency_ms in args["latencies"]:
        seq = statistics.median(times[(latency_ms, "sequential")])
        ovl = statistics.median(times[(latency_ms, "overlapped")])
        row = {"latency_ms": latency_ms, "sequential_s": seq, "overlapped_s": ovl,
               "a2a_per_pair": 4 * n_moe, "moe_blocks": n_moe}
        if times[(latency_ms, "plain")]:
            row["plain_stage_s"] = statistics.median(times[(latency_ms, "plain")])
            if rank == 0:
                print(f"latency   0.0 ms/a2a  unsegmented DeepseekStage F then B {row['plain_stage_s'] * 1e3:8.1f} ms",
                      flush=True)
        rows.append(row)
        if rank == 0:
            print(f"latency {latency_ms:5.1f} ms/a2a  sequential {seq * 1e3:8.1f} ms  overlapped {ovl * 1e3:8.1f} ms  "
                  f"overlapped/sequential {ovl / seq:.3f}", flush=True)
    if rank == 0:
        tmp = outpath + ".tmp"
        Path(tmp).write_text(json.dumps({"args": args, "rows": rows}, indent=1))
        os.replace(tmp, outpath)


class SequentialFBStage(DeepseekStage):
    """The peer of the pipeline mode: the same segmented stage, F&B run as F then BW."""

    def forward_backward_overlapped(
        self, f: ForwardArgs, b: BackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y = self.forward(f.chunk, f.mb, f.x)
        return y, self.backward_full(b.chunk, b.mb, b.grad_y)


def pipeline_worker(rank: int, world: int, args: dict[str, Any], outpath: str) -> None:
    """Whole DualPipeV steps (pp 2 x ep 2 on 4 ranks): overlapped F&B vs F then B, same latencies."""
    cfg = bench_config(hidden=args["hidden"], layers=args["layers"])
    plan = plan_layout(
        world_size=world, pp=2, ep=2, num_layers=cfg.num_hidden_layers, n_routed_experts=cfg.n_routed_experts,
        n_group=cfg.n_group, topk_group=cfg.topk_group, pieces_per_rank=2, stage_layers=args["stage_layers"],
    )
    mesh = ParallelMesh.build(plan)
    exs = {mode: ParallelExecutor(cfg, mesh=mesh, plan=plan, schedule="dualpipev", micro_batch_size=1, seed=0,
                                  overlap_fb=True, stage_cls=cls)
           for mode, cls in (("sequential", SequentialFBStage), ("overlapped", DeepseekStage))}
    latency = {"s": 0.0}
    _add_latency([d for ex in exs.values() for m in moe_modules(ex.model)
                  if isinstance(d := m.dispatcher, AllToAllDispatcher)], latency)
    M = args["microbatches"]
    g = torch.Generator().manual_seed(7)
    tok = torch.randint(0, cfg.vocab_size, (M * mesh.dp, args["seq"] + 1), generator=g)
    ids, labels = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    times = {(lat, mode): [] for lat in args["latencies"] for mode in exs}
    for it in range(args["iters"] + 1):
        for latency_ms in args["latencies"]:
            latency["s"] = latency_ms / 1000.0
            for mode, ex in exs.items():
                dist.barrier()
                ex.step(ids, labels, mtp_weight=0.3)
                dt = torch.tensor([ex.last_step_result.wall_s])
                dist.all_reduce(dt, op=dist.ReduceOp.MAX)
                if it:
                    times[(latency_ms, mode)].append(float(dt))
        if rank == 0 and it:
            print(f"iteration {it}/{args['iters']}", flush=True)
    rows = []
    for latency_ms in args["latencies"]:
        seq = statistics.median(times[(latency_ms, "sequential")])
        ovl = statistics.median(times[(latency_ms, "overlapped")])
        rows.append({"latency_ms": latency_ms, "sequential_s": seq, "overlapped_s": ovl})
        if rank == 0:
            print(f"dualpipev pp2 x ep2, M={M}: latency {latency_ms:5.1f} ms/a2a  step with F then B "
                  f"{seq * 1e3:8.1f} ms  with F&B overlapped {ovl * 1e3:8.1f} ms  ratio {ovl / seq:.3f}", flush=True)
    if rank == 0:
        tmp = outpath + ".tmp"
        Path(tmp).write_text(json.dumps({"args": args, "rows": rows}, indent=1))
        os.replace(tmp, outpath)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3, help="transformer layers (the first is dense)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--latency-ms", type=float, nargs="+", default=[0.0])
    ap.add_argument("--pipeline", action="store_true",
                    help="whole DualPipeV steps on 4 ranks (pp 2 x ep 2) instead of one F&B pair on 2")
    ap.add_argument("--microbatches", type=int, default=8, help="--pipeline: micro-batches per step")
    ap.add_argument("--stage-layers", type=int, nargs="+", default=None,
                    help="--pipeline: layers of the 4 DualPipeV pieces (default: balanced)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    out = a.out or ("outputs/bench_overlap_pipeline.json" if a.pipeline else "outputs/bench_overlap.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    args = {"hidden": a.hidden, "layers": a.layers, "batch": a.batch, "seq": a.seq, "iters": a.iters,
            "latencies": sorted(a.latency_ms), "microbatches": a.microbatches,
            "stage_layers": a.stage_layers}
    if a.pipeline:
        spawn(4, pipeline_worker, args, out)
        return
    spawn(2, worker, args, out)
    res = json.loads(Path(out).read_text())
    base = next((r for r in res["rows"] if r["latency_ms"] == 0), None)
    c = base["sequential_s"] if base else float("nan")
    print(f"C (pair compute incl. loopback gloo, sequential at L=0) = {c * 1e3:.1f} ms")
    for r in res["rows"]:
        a_s = r["latency_ms"] / 1000.0 * r["a2a_per_pair"]
        print(f"L={r['latency_ms']:.1f} ms: A = {a_s * 1e3:.0f} ms  sequential/(C+A) {r['sequential_s'] / (c + a_s):.3f}  "
              f"overlapped/max(C,A) {r['overlapped_s'] / max(c, a_s):.3f}  overlapped/sequential "
              f"{r['overlapped_s'] / r['sequential_s']:.3f}")


if __name__ == "__main__":
    main()
