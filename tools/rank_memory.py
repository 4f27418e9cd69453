"""One rank's model state, materialised for real on this CPU, against the analytic count.

    .venv/bin/python -m tools.rank_memory model=deepseek_v3_671b parallel=deepseek_v3_2048 --rank 0
    .venv/bin/python -m tools.rank_memory model=tiny parallel=pp2_ep2 --world 4 --rank 3 --json out.json

Positional arguments are Hydra overrides of the trainer's config (conf/config.yaml). `--world`
is the layout's world size (default 2048, the DeepSeek-V3 recipe's), `--ranks-per-node` its node
size (default parallel.ranks_per_node, else 8 when it divides the world, else the world). No process group and no other rank: the mesh is
`ParallelMesh.local` (groups known by size and place only), and the trainer's own
`build_executor(..., init=False)` builds rank R's pieces on the meta device and allocates what
the rank owns: its parameters (float32), then a float32 .grad for each (what backward leaves),
and its ZeRO-1 shards (master weights, moments, the reduced-gradient shard the first step
allocates). Nothing is initialised (`--touch` writes zeros everywhere, so that resident memory
shows the whole footprint; it then needs that much RAM), so the allocation is real virtual memory
whose pages the kernel maps on first write.

Measured bytes are the distinct storages of those tensors; the analytic bytes come from the
config's formulas (`megads.parallel.memory`), the only non-formula term being ZeRO-1's bucket
padding (read from the optimizer and named; plus, with float32 moments, the fused AdamW's
16-element tails and step counters). Buffers (rotary tables, router bias and counts) are printed
beside, not modelled. The exit status is 1 when a line differs. Peak RSS is the process's
`ru_maxrss`; the time is the build plus the allocation.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from megads.pipeline.schedules import build_schedule, min_microbatches

from megads.parallel.executor import ParallelExecutor
from megads.parallel.memory import FP32, RankParams, Zero1Bytes, rank_parameters
from megads.parallel.mesh import ParallelMesh
from megads.parallel.stages import piece_specs, rank_pieces
from megads.train.cli import compose_config

GiB = 1 << 30


def _storage_bytes(tensors: list[torch.Tensor], seen: set[int]) -> int:
    """Bytes of the storages of `tensors` not counted yet (views of one storage count once)."""
    total = 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def analytic_parameters(cfg: Any, plan: Any, *, pp_rank: int) -> RankParams:
    """The rank's parameters from the config and the schedule's piece placement alone."""
    p = cfg.parallel
    schedule = p.schedule if p.pp > 1 else "1f1b"
    n = min_microbatches(schedule, pp=plan.pp)
    layout = build_schedule(schedule, pp=plan.pp, num_microbatches=n).layout
    specs = piece_specs(plan.stage_layers)
    mine = [specs[i] for i in rank_pieces(layout, rank=pp_rank)]
    tied = set(layout.piece_ranks(0)) != set(layout.piece_ranks(layout.num_pieces - 1))
    return rank_parameters(
        cfg.model, layers=[i for s in mine for i in s.layers], first=any(s.first for s in mine),
        last=any(s.last for s in mine), ep=plan.ep, embedding_tied=tied,
    )


def allocate_gradients(ex: ParallelExecutor, *, touch: bool) -> None:
    """A float32 .grad per parameter and each ZeRO-1 space's reduced-gradient shard."""
    make = torch.zeros_like if touch else torch.empty_like
    for p in ex.model.parameters():
        p.grad = make(p)
    for sp in ex.optimizer.spaces:
        if sp.grad_buf is None:
            sp.grad_buf = make(sp.master)


def measure(ex: ParallelExecutor) -> dict[str, Any]:
    """Measured bytes of parameters, gradients, ZeRO-1 state and buffers, by kind."""
    seen: set[int] = set()
    tied_ids = {id(p) for sp in ex.optimizer.spaces if sp.kind == "tied" for b in sp.buckets for p in b.params}
    by_kind: dict[str, list[torch.Tensor]] = {"dense": [], "expert": [], "tied": []}
    for name, p in ex.model.named_parameters():
        kind = "expert" if name in ex.expert_names else "tied" if id(p) in tied_ids else "dense"
        by_kind[kind].append(p)
    out: dict[str, Any] = {"params": {k: _storage_bytes(v, seen) for k, v in by_kind.items()}}
    out["grads"] = {k: _storage_bytes([p.grad for p in v if p.grad is not None], seen) for k, v in by_kind.items()}
    zero1: dict[str, dict[str, int]] = {}
    for sp in ex.optimizer.spaces:
        z = zero1.setdefault(sp.kind, {"master": 0, "moments": 0, "grad_shard": 0, "padding": 0, "fused_extra": 0})
        z["master"] += _storage_bytes([sp.master], seen)
        z["moments"] += _storage_bytes([sp.exp_avg, sp.exp_avg_sq], seen)
        z["grad_shard"] += _storage_bytes([sp.grad_buf], seen)
        z["padding"] += sum(b.padded - b.numel for b in sp.buckets)
        if sp.fused is not None:  # the 16-element tail parameter, its moments, the step counters
            extra = [t for st in sp.fused.inner.state.values() for t in st.values()]
            extra += [sp.fused.tail] if sp.fused.tail is not None else []
            z["fused_extra"] += _storage_bytes(extra, seen)
    out["zero1"] = zero1
    out["buffers"] = _storage_bytes(list(ex.model.buffers()), seen)
    return out


def compare(cfg: Any, plan: Any, mesh: ParallelMesh, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows (what, measured, analytic, named extra) for every parameter, gradient, ZeRO-1 line."""
    params = analytic_parameters(cfg, plan, pp_rank=mesh.pp_rank)
    rows = []
    for kind in ("dense", "expert", "tied"):
        n = getattr(params, kind)
        rows.append({"what": f"parameters {kind}", "measured": measured["params"][kind], "analytic": n * FP32, "extra": 0})
    for kind in ("dense", "expert", "tied"):
        n = getattr(params, kind)
        rows.append({"what": f"gradients {kind}", "measured": measured["grads"][kind], "analytic": n * FP32, "extra": 0})
    moments = 2 if cfg.parallel.moments_dtype == "bfloat16" else 4
    for kind in ("dense", "expert", "tied"):
        z = measured["zero1"].get(kind)
        n = getattr(params, kind)
        if z is None:
            # no space of this kind: right only when the rank holds no such parameter
            a0 = Zero1Bytes(numel=n, group_size=1, padding=0, moments_bytes=moments).total
            rows.append({"what": f"zero1 {kind}", "measured": 0, "analytic": a0, "extra": 0})
            continue
        g = (mesh.edp if kind == "expert" else mesh.dp) if cfg.parallel.zero1 else 1
        a = Zero1Bytes(numel=n, group_size=g, padding=z["padding"], moments_bytes=moments)
        rows.append({"what": f"zero1 {kind} master (g={g}, padding {z['padding']} el)", "measured": z["master"],
                     "analytic": a.master, "extra": 0})
        rows.append({"what": f"zero1 {kind} moments", "measured": z["moments"], "analytic": a.moments, "extra": 0})
        rows.append({"what": f"zero1 {kind} grad shard", "measured": z["grad_shard"], "analytic": a.grad_shard, "extra": 0})
        if z["fused_extra"]:
            rows.append({"what": f"zero1 {kind} fused-AdamW tail + step counters", "measured": z["fused_extra"],
                         "analytic": 0, "extra": z["fused_extra"]})
    return rows


def run(overrides: list[str], *, world: int, rank: int, ranks_per_node: int | None, touch: bool) -> dict[str, Any]:
    from megads.parallel.mesh import DistEnv
    from megads.train.trainer import build_executor

    cfg = compose_config(overrides)
    rpn = ranks_per_node or cfg.parallel.ranks_per_node or (8 if world % 8 == 0 else world)
    plan = cfg.parallel.plan(world_size=world, model=cfg.model, ranks_per_node=rpn)
    mesh = ParallelMesh.local(plan, rank=rank)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank % rpn, local_world_size=rpn,
                  master_addr="127.0.0.1", master_port=0, source="single")
    t0 = time.perf_counter()
    ex = build_executor(cfg, env=env, device=torch.device("cpu"), autocast_dtype=None, mesh=mesh, init=False)
    if touch:
        with torch.no_grad():
            for p in ex.model.parameters():
                p.zero_()
    allocate_gradients(ex, touch=touch)
    seconds = time.perf_counter() - t0
    measured = measure(ex)
    rows = compare(cfg, plan, mesh, measured)
    return {
        "rank": rank, "world": world, "mesh": mesh.describe(), "pieces": [s.piece for s in ex.specs],
        "layers": [i for s in ex.specs for i in s.layers], "rows": rows, "buffers": measured["buffers"],
        "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "touched": touch, "overrides": overrides,
        "param_numel": {n: p.numel() for n, p in ex.model.named_parameters()},
        "expert_names": sorted(ex.expert_names), "ep_rank": mesh.ep_rank,
    }


def report(res: dict[str, Any]) -> str:
    lines = [f"{res['mesh']}; pieces {res['pieces']}, layers {res['layers'][0] if res['layers'] else '-'}.."
             f"{res['layers'][-1] if res['layers'] else '-'} ({len(res['layers'])})",
             f"{'':52s} {'measured B':>16s} {'analytic B':>16s} {'GiB':>8s}  ok"]
    total = 0
    for r in res["rows"]:
        ok = r["measured"] == r["analytic"] + r["extra"]
        total += r["measured"]
        lines.append(f"{r['what']:52s} {r['measured']:16,d} {r['analytic']:16,d} {r['measured'] / GiB:8.3f}  "
                     f"{'yes' if ok else 'NO'}")
    lines.append(f"{'model state in all':52s} {total:16,d} {'':16s} {total / GiB:8.3f}")
    lines.append(f"{'buffers (not modelled)':52s} {res['buffers']:16,d} {'':16s} {res['buffers'] / GiB:8.3f}")
    lines.append(f"build + allocation {res['seconds']:.1f} s; peak RSS {res['peak_rss'] / GiB:.2f} GiB "
                 f"({'every byte written' if res['touched'] else 'allocated, untouched pages are not resident'})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=deepseek_v3_671b parallel=deepseek_v3_2048")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2048)
    parser.add_argument("--ranks-per-node", type=int, default=None)
    parser.add_argument("--touch", action="store_true", help="write zeros into every byte (RSS = the footprint)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    res = run(list(args.overrides), world=args.world, rank=args.rank, ranks_per_node=args.ranks_per_node,
              touch=args.touch)
    print(report(res))
    if args.json is not None:
        args.json.write_text(json.dumps(res, indent=1))
    return 0 if all(r["measured"] == r["analytic"] + r["extra"] for r in res["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
