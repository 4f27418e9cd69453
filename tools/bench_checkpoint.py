"""Checkpoint throughput: DCP step folders (megads.checkpoint) vs per-rank torch.save/torch.load.

    .venv/bin/python -m tools.bench_checkpoint [--model small] [--reps 3] [--warmup 1] [--dir DIR]

One spawned group of 4 gloo CPU ranks trains the preset (conf/model/<model>.yaml) for one step
under pp2 x ep2 (dp 2, edp 1; global batch 8 x 64 tokens, micro-batch 2) so that the ZeRO-1
optimizer state exists, then measures on every rank, interleaved, `--reps` times each:

  dcp save    CheckpointWriter(root, keep_last=0).save(step, training_entries(ex, ...)) + wait():
              the trainer's synchronous save (DCP write with fsync, SHA-256 of every file,
              manifest.json, meta.json, rename)
  torch.save  the peer: every rank torch.saves its entries' tensors (a ShardView's `.local`) as a
              dict of plain tensors to its own file, then fsync
  async save  CheckpointWriter(..., async_save=True): `blocking_s` (what training waits for:
              barrier + staged_copy to CPU memory) and the time until wait() returns
  dcp load    load_training_state(folder, ex): DCP read into the executor's tensors + the
              optimizer's restore (an all-gather of the parameters from the master weights)
  torch.load  every rank torch.loads its file (weights_only=True) into fresh tensors

Each time is taken between a barrier before and a barrier after (max over ranks); the median of
the repetitions is printed, after `--warmup` untimed rounds. A save right after another ~3 GB
one is slower (the virtual disk is still absorbing the previous one), so the order of the three
saves rotates every round. Bytes: DCP = the data files listed in manifest.json (.metadata
included); torch.save = the sum of the rank files. DCP writes a replicated tensor once (dp
replicas, the last stage's embedding copy), the peer writes every rank's copy, so its byte count
is larger; MB/s (10^6 bytes/s) is each method's own bytes over its own time.

Page cache: saves fsync (both methods) but the written pages stay cached; before each "cold"
load every file is dropped from the page cache with posix_fadvise(POSIX_FADV_DONTNEED) (no root
needed; `fincore` reports what stayed resident), a "warm" load follows at once. The disk is
whatever backs --dir (a virtual disk on the dev machines: the host may cache it too).

A breakdown follows the table (for the async ratio): staged_copy alone, DCP's write alone
(save_state) and the commit alone (commit_folder: hashing, manifest, rename).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megads.model.config import ModelConfig
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.testing.parallel import make_batches, spawn
from tools.count_params import load_preset

WORLD, PP, EP = 4, 2, 2
SEQ_LEN, GLOBAL_BATCH, MICRO_BATCH = 64, 8, 2
MB = 1e6


# ------------------------------------------------------------------------------------ helpers
def _timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
    """fn(*args, **kwargs) between a barrier before and one after; seconds, max over ranks."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    dist.barrier()
    return _max(time.perf_counter() - t0), out


def _max(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _drop_cache(paths: list[Path]) -> None:
    """Evict the files' clean pages from the page cache (they are fsynced already)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of the files in the page cache (util-linux fincore); None when it is missing."""
    if not paths or shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return None
    return sum(int(x) for x in out.stdout.split())


def _dcp_bytes(folder: Path) -> int:
    import json

    from megads.checkpoint.dcp import MANIFEST_FILE

    files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    return sum(int(e["bytes"]) for e in files.values())


def _torch_save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with path.open("wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def _rm(path: Path, rank: int) -> None:
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


# ------------------------------------------------------------------------------------- worker
def _worker(rank: int, world: int, cfg: ModelConfig, rounds: int, root_s: str, out_s: str) -> None:
    from megads.checkpoint.dcp import ShardView, commit_folder, save_state, staged_copy
    from megads.checkpoint.state import load_training_state, training_entries
    from megads.checkpoint.writer import CheckpointWriter

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives, once per call
    root, out = Path(root_s), Path(out_s)
    plan = plan_layout(world_size=world, pp=PP, ep=EP, num_layers=cfg.num_hidden_layers,
                       n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group)
    mesh = ParallelMesh.build(plan)
    ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, micro_batch_size=MICRO_BATCH, seed=0,
                          optim=OptimSettings(lr=1e-4))
    ((ids, labels),) = make_batches(cfg, steps=1, global_batch=GLOBAL_BATCH, seq_len=SEQ_LEN)
    step_s, _ = _timed(lambda: ex.step(ids, labels, mtp_weight=0.3))

    def entries(step: int) -> dict[str, Any]:
        return training_entries(ex, step=step, tokens=0.0, loader_state={"windows": step})

    def meta(step: int) -> dict[str, Any]:
        return {"step": step, "tokens": 0.0, "world_size": world}

    def sync_save(writer: CheckpointWriter, step: int) -> Path:
        folder = writer.save(step, entries(step), meta=meta(step))
        writer.wait()
        return folder

    plain = {k: (v.local if isinstance(v, ShardView) else v) for k, v in entries(1).items()
             if isinstance(v, ShardView | torch.Tensor)}
    local_bytes = _max(sum(t.numel() * t.element_size() for t in plain.values()))
    total_local = torch.tensor([sum(t.numel() * t.element_size() for t in plain.values())], dtype=torch.float64)
    dist.all_reduce(total_local)

    sync_root, async_root, torch_root = root / "dcp", root / "dcp_async", root / "torch"
    parts_root = root / "dcp_parts"
    for d in (sync_root, async_root, torch_root, parts_root):
        if rank == 0:
            d.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    sync_writer = CheckpointWriter(sync_root, keep_last=0)
    async_writer = CheckpointWriter(async_root, keep_last=0, async_save=True)  # collective: its own group
    my_file = torch_root / f"rank{rank:05d}.pt"
    res: dict[str, list[float]] = {k: [] for k in (
        "dcp_save", "torch_save", "async_blocking", "async_total", "async_total_thread",
        "dcp_load_cold", "dcp_load_warm", "torch_load_cold", "torch_load_warm",
        "staged_copy", "save_state", "commit", "resident_cold_dcp", "resident_cold_torch")}
    sizes = {"dcp": 0, "torch": 0}
    last: dict[str, Path] = {}

    def dcp_sync(step: int) -> None:  # (a) the trainer's synchronous save
        if "dcp" in last:
            _rm(last["dcp"], rank)  # the previous round's folder: the last one stays for the loads
        t, last["dcp"] = _timed(sync_save, sync_writer, step)
        res["dcp_save"].append(t)
        sizes["dcp"] = _dcp_bytes(last["dcp"])

    def peer_save(step: int) -> None:  # (b) the peer
        t, _ = _timed(_torch_save, my_file, plain)
        res["torch_save"].append(t)
        dist.barrier()
        sizes["torch"] = sum(p.stat().st_size for p in _files(torch_root))

    def dcp_async(step: int) -> None:  # (d) blocking part, and until wait() returns
        dist.barrier()
        t0 = time.perf_counter()
        async_writer.save(step, entries(step), meta=meta(step))
        blocking = async_writer.blocking_s[-1]
        async_writer.wait()
        dist.barrier()
        res["async_total"].append(_max(time.perf_counter() - t0))
        res["async_blocking"].append(_max(blocking))
        res["async_total_thread"].append(_max(async_writer.total_s[-1]))
        _rm(async_root / f"step_{step:08d}", rank)

    def breakdown(step: int) -> None:  # staged_copy alone, DCP's write alone, the commit alone
        e = entries(step)
        t, staged = _timed(staged_copy, e)
        res["staged_copy"].append(t)
        del staged
        tmp, final = parts_root / f"step_{step:08d}.tmp", parts_root / f"step_{step:08d}"
        if rank == 0:
            tmp.mkdir()
        dist.barrier()
        t, _ = _timed(save_state, tmp, e)
        res["save_state"].append(t)
        t, _ = _timed(commit_folder, tmp, final, meta=meta(step))
        res["commit"].append(t)
        _rm(final, rank)

    # a save right after another one of 3 GB is slower (the disk still absorbs the previous one):
    # the order of the three rotates each round so none always follows the same one
    methods = [dcp_sync, peer_save, dcp_async]
    for rnd in range(rounds):
        for fn in methods[rnd % 3:] + methods[: rnd % 3]:
            fn(10 + rnd)
        breakdown(10 + rnd)
    folder = last["dcp"]

    # (c) loads, cold then warm, interleaved
    torch_files = _files(torch_root)
    dcp_files = _files(folder)
    for _ in range(rounds):
        dist.barrier()
        if rank == 0:
            _drop_cache(dcp_files)
            resident = _resident_bytes(dcp_files)
            res["resident_cold_dcp"].append(-1.0 if resident is None else float(resident))
        t, _ = _timed(load_training_state, folder, ex)
        res["dcp_load_cold"].append(t)
        t, _ = _timed(load_training_state, folder, ex)
        res["dcp_load_warm"].append(t)
        dist.barrier()
        if rank == 0:
            _drop_cache(torch_files)
            resident = _resident_bytes(torch_files)
            res["resident_cold_torch"].append(-1.0 if resident is None else float(resident))
        t, loaded = _timed(torch.load, my_file, weights_only=True)
        res["torch_load_cold"].append(t)
        assert loaded.keys() == plain.keys()
        del loaded
        t, loaded = _timed(torch.load, my_file, weights_only=True)
        res["torch_load_warm"].append(t)
        del loaded

    if rank == 0:
        torch.save({"res": res, "dcp_bytes": sizes["dcp"], "torch_bytes": sizes["torch"], "step_s": step_s,
                    "local_bytes_max": local_bytes, "local_bytes_sum": float(total_local),
                    "mesh": mesh.describe_degrees(), "n_files_dcp": len(dcp_files)}, out / "result.pt")
    dist.barrier()


# --------------------------------------------------------------------------------------- main
def _machine() -> str:
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.0f} GiB"
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"nproc {os.cpu_count()}, RAM {mem}, CPU {cpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="preset under conf/model/ (or a YAML path)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each measurement (median printed)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (first-call costs)")
    ap.add_argument("--dir", default=None, help="where the checkpoints are written (default: the system temp dir)")
    args = ap.parse_args()
    cfg = load_preset(args.model)
    command = " ".join([".venv/bin/python -m tools.bench_checkpoint", *sys.argv[1:]])
    start = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=args.dir))
    try:
        with tempfile.TemporaryDirectory() as out:
            spawn(WORLD, _worker, cfg, args.warmup + args.reps, str(root), out)
            r = torch.load(Path(out) / "result.pt", weights_only=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    end = datetime.datetime.now(datetime.UTC)
    load_after = os.getloadavg()
    timed = {k: v[args.warmup:] for k, v in r["res"].items()}
    res = {k: statistics.median(v) if v else float("nan") for k, v in timed.items()}

    def row(name: str, nbytes: int, save: float, cold: float, warm: float) -> str:
        return (f"| {name} | {nbytes / MB:,.0f} MB | {save:.2f} | {nbytes / MB / save:,.0f} | "
                f"{cold:.2f} | {nbytes / MB / cold:,.0f} | {warm:.2f} | {nbytes / MB / warm:,.0f} |")

    print(f"Command: `{command}`")
    print(f"Date: {start:%Y-%m-%d %H:%M}-{end:%H:%M} UTC; machine: {_machine()}; "
          f"load average (1/5/15 min) {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after")
    print(f"Model {args.model} ({cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, MTP "
          f"{cfg.num_nextn_predict_layers}); {WORLD} gloo CPU ranks, pp{PP} x ep{EP} ({r['mesh']}); one training "
          f"step ({GLOBAL_BATCH} x {SEQ_LEN} tokens, micro-batch {MICRO_BATCH}: {r['step_s']:.1f} s) before the "
          f"measurements; tensors per rank {r['local_bytes_max'] / MB:,.0f} MB at most, "
          f"{r['local_bytes_sum'] / MB:,.0f} MB over all ranks; median of {args.reps} after {args.warmup} "
          f"untimed round(s); "
          f"MB = 10^6 bytes; checkpoints under {Path(args.dir or tempfile.gettempdir()).resolve()}")
    print()
    print("| method | bytes | save s | save MB/s | load s (cold) | load MB/s (cold) | load s (warm) | load MB/s (warm) |")
    print("|---|---|---|---|---|---|---|---|")
    print(row("DCP (CheckpointWriter + load_training_state)", r["dcp_bytes"], res["dcp_save"],
              res["dcp_load_cold"], res["dcp_load_warm"]))
    print(row("torch.save / torch.load per rank", r["torch_bytes"], res["torch_save"],
              res["torch_load_cold"], res["torch_load_warm"]))
    print()
    ratio = res["async_blocking"] / res["dcp_save"]
    print(f"Async save: blocking {res['async_blocking']:.2f} s, total {res['async_total']:.2f} s "
          f"(background thread's own total_s {res['async_total_thread']:.2f} s), sync {res['dcp_save']:.2f} s, "
          f"ratio blocking/sync **{ratio:.2f}** (goal <= 0.2: {'met' if ratio <= 0.2 else 'NOT met'})")
    print(f"Breakdown (median, max over ranks): staged_copy {res['staged_copy']:.2f} s; sync save = DCP write "
          f"(save_state) {res['save_state']:.2f} s + commit (SHA-256, manifest, rename) {res['commit']:.2f} s")
    cold = [x for x in timed["resident_cold_dcp"] + timed["resident_cold_torch"] if x >= 0]
    print("Every timed repetition (s): " + "; ".join(
        f"{k} {' '.join(f'{x:.2f}' for x in v)}" for k, v in timed.items() if not k.startswith("resident")))
    print("Page cache: saves fsync; cold loads after posix_fadvise(DONTNEED) of every file"
          + (f" (fincore: at most {max(cold) / MB:,.1f} MB stayed resident)" if cold else " (fincore unavailable)")
          + "; warm loads right after, from the page cache.")


if __name__ == "__main__":
    main()
