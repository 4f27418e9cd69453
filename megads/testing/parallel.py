"""Multi-process harness: spawn real gloo ranks, a tiny model, and the single-process reference.

Used by the equivalence tests, the ep scale check and `tools/bench_parallel.py`. A worker runs
several layouts one after the other inside one spawned group (process start-up dominates on a
2-core machine), each layout with its own mesh groups, and writes what it owns (losses,
parameters with their global expert offsets, balancing biases, optimizer-state bytes, memory)
to `outdir/<tag>.rank<r>.pt`; the parent compares with `reference_run`.

Shapes: G global batch sequences, T sequence, E routed experts.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megads.model.balance import update_expert_bias
from megads.model.config import ModelConfig
from megads.model.linear import LinearFactory
from megads.model.transformer import DeepseekV3
from megads.parallel.config import pieces_per_rank
from megads.parallel.executor import OptimSettings, ParallelExecutor, router_slots
from megads.parallel.mesh import LayoutPlan, ParallelMesh, plan_layout
from megads.testing.launch import free_port


def tiny_config(**overrides: Any) -> ModelConfig:
    """The smallest model that exercises everything: dense + MoE layers, MTP, group routing."""
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=4, num_attention_heads=2, n_shared_experts=1, n_routed_experts=8,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=64, num_nextn_predict_layers=1, initializer_range=0.02,
        seq_aux_loss_alpha=0.01,
    )
    base.update(overrides)
    return ModelConfig(**base)


def make_batches(cfg: ModelConfig, *, steps: int, global_batch: int, seq_len: int, seed: int = 1234) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        tok = torch.randint(0, cfg.vocab_size, (global_batch, seq_len + 1), generator=g)
        out.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    return out


@dataclass(frozen=True)
class LayoutSpec:
    pp: int
    ep: int
    schedule: str = "1f1b"
    zero1: bool = True
    ranks_per_node: int | None = None
    via_run: bool = False  # drive the executor through ParallelExecutor.run (the trainer's call)
    cp: int = 1  # context parallel
    overlap_fb: bool = False  # DualPipe/DualPipeV: F&B chunks interleaved at the all-to-alls

    @property
    def tag(self) -> str:
        cp = f"_cp{self.cp}" if self.cp > 1 else ""
        ov = "_overlap" if self.overlap_fb else ""
        return f"pp{self.pp}_ep{self.ep}{cp}_{self.schedule}{'' if self.zero1 else '_nozero'}{ov}"


def valid_layouts(world: int, *, n_experts: int, num_layers: int) -> list[LayoutSpec]:
    """Every (pp, ep) for `world` ranks that `plan_layout` accepts."""
    out = []
    for pp in range(1, world + 1):
        for ep in range(1, world + 1):
            try:
                plan_layout(world_size=world, pp=pp, ep=ep, num_layers=num_layers, n_routed_experts=n_experts)
            except ValueError:
                continue
            out.append(LayoutSpec(pp, ep))
    return out


# ------------------------------------------------------------------------------------------------
# single-process reference


def reference_model_and_optimizer(
    cfg: ModelConfig, *, optim: OptimSettings, seed: int, factory: LinearFactory | None = None
) -> tuple[DeepseekV3, torch.optim.AdamW]:
    """The single-process model every layout starts from (built under `seed`) and its AdamW."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg, factory=factory)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
        foreach=False,
    )
    return model, opt


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_run(
    cfg: ModelConfig,
    *,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    micro_batch_size: int,
    mtp_weight: float,
    optim: OptimSettings,
    seed: int,
    factory: LinearFactory | None = None,
) -> dict[str, Any]:
    """The same steps on one process: torch.optim.AdamW, clip_grad_norm_, same micro-batches;
    on one thread, as every spawned rank runs (`_entry`). `factory`: the GEMM backend (FP8)."""
    with one_thread():
        model, opt = reference_model_and_optimizer(cfg, optim=optim, seed=seed, factory=factory)
        slots = router_slots(model, cfg=cfg)
        losses = []
        for ids_GT, labels_GT in batches:
            G = ids_GT.shape[0]
            M = G // micro_batch_size
            total = 0.0
            for i in range(0, G, micro_batch_size):
                out = model.compute_loss(ids_GT[i : i + micro_batch_size], labels_GT[i : i + micro_batch_size], mtp_weight=mtp_weight)
                (out.total / M).backward()
                total += float(out.total.detach()) / M
            norm = clip_grad_norm_fp64(model.parameters(), optim.max_grad_norm) if optim.max_grad_norm > 0 else None
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_expert_bias(model, gamma=optim.bias_update_speed)
            losses.append((total, float(norm) if norm is not None else float("nan")))
        return {
            "losses": losses,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "biases": {s: r.e_score_correction_bias.clone() for s, r in slots.items()},
        }


# ------------------------------------------------------------------------------------------------
# spawning


# Modules the fork server imports once, so that a started rank begins with them loaded: a fresh
# `spawn` process pays ~2-3 s of imports (torch alone 1.9 s), and the suite starts ~300 ranks.
_FORKSERVER_PRELOAD = [
    "torch", "torch._dynamo", "torch.distributed", "torch.distributed.checkpoint", "numpy",
    "megads.model", "megads.parallel.executor", "megads.parallel.mesh", "megads.testing.parallel",
]


def _rank_main(rank: int, env: dict[str, str], fn: Callable[..., None], *args: Any) -> None:
    # A fork-server child starts with the server's environment: take the caller's, as `spawn` would.
    os.environ.clear()
    os.environ.update(env)
    fn(rank, *args)


def start_ranks(fn: Callable[..., None], args: tuple[Any, ...], nprocs: int) -> None:
    """Run fn(rank, *args) in `nprocs` fresh processes, like `torch.multiprocessing.spawn`, but
    forked from one fork server that has torch and megads imported already (started on first use,
    reused by every later call of this process). Raises if any process fails."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    mp.start_processes(_rank_main, args=(dict(os.environ), fn, *args), nprocs=nprocs, join=True,
                       start_method="forkserver")


def _entry(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
    )
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn(world: int, fn: Callable[..., None], *args: Any) -> None:
    """Run fn(rank, world, *args) on `world` fresh gloo ranks (raises if any rank fails)."""
    start_ranks(_entry, (world, free_port(), fn, args), world)


def peak_rss_mib() -> float:
    """Peak resident set of this process (shared library pages included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def private_mib() -> float:
    """Current private memory of this process (Linux smaps_rollup; what it adds to the machine)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            kib = sum(int(line.split()[1]) for line in f if line.startswith(("Private_Clean", "Private_Dirty")))
        return kib / 1024.0
    except OSError:
        return float("nan")


def plan_spec(cfg: ModelConfig, spec: LayoutSpec, *, world: int) -> LayoutPlan:
    return plan_layout(
        world_size=world, pp=spec.pp, ep=spec.ep, num_layers=cfg.num_hidden_layers,
        n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
        ranks_per_node=spec.ranks_per_node, node_limit=4, pieces_per_rank=pieces_per_rank(spec.schedule), cp=spec.cp,
    )


def equivalence_worker(
    rank: int,
    world: int,
    cfg: ModelConfig,
    layouts: Sequence[LayoutSpec],
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    micro_batch_size: int,
    mtp_weight: float,
    optim: OptimSettings,
    seed: int,
    outdir: str,
) -> None:
    for spec in layouts:
        plan = plan_spec(cfg, spec, world=world)
        mesh = ParallelMesh.build(plan)
        ex = ParallelExecutor(
            cfg, mesh=mesh, plan=plan, schedule=spec.schedule, micro_batch_size=micro_batch_size,
            seed=seed, optim=optim, zero1=spec.zero1, overlap_fb=spec.overlap_fb,
        )
        metrics = []
        t0 = time.perf_counter()
        for ids, labels in batches:
            if spec.via_run:
                mbs = [{"input_ids": i, "labels": t} for i, t in ex.split_batch(ids, labels)]
                tm = ex.run(mbs, lr=optim.lr, mtp_weight=mtp_weight, bias_update_speed=optim.bias_update_speed)
                extras = {"load": {k: v.counts.clone() for k, v in tm.expert_load.items()}, "tokens": tm.tokens}
                metrics.append((tm.loss, tm.grad_norm, tm.lm, tm.mtp, tm.balance, extras))
                continue
            m = ex.step(ids, labels, mtp_weight=mtp_weight)
            metrics.append((m.loss, m.grad_norm, m.lm, m.mtp, m.balance, m.extras))
        wall = time.perf_counter() - t0
        result = {
            "rank": rank, "mesh": mesh.describe(), "metrics": metrics, "wall_s": wall,
            "params": ex.global_named_parameters(), "biases": ex.biases(),
            "state_bytes": ex.optimizer.state_bytes(),
            "unsharded_state_bytes": ex.optimizer.unsharded_state_bytes(),
            "dp": mesh.dp, "edp": mesh.edp, "peak_rss_mib": peak_rss_mib(), "private_mib": private_mib(),
        }
        path = Path(outdir) / f"{spec.tag}.rank{rank}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)
        dist.barrier()


def clip_grad_norm_fp64(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ with the total norm accumulated in float64 (as Zero1AdamW does):
    the fp32 norms of the two sides would differ by rounding, and a rounding difference in the
    clip coefficient is enough to flip a near-tie of the top-k routing a few steps later."""
    params = [p for p in params if p.grad is not None]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64)
                                                  for p in params]))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def compare_with_reference(
    ref: dict[str, Any], *, outdir: str | Path, tag: str, world: int, rtol: float
) -> list[str]:
    """Every rank's losses, parameters (slice by slice) and biases against the reference (the
    parameters and biases only when `ref` has them)."""
    problems: list[str] = []

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-30))

    for r in range(world):
        res = torch.load(Path(outdir) / f"{tag}.rank{r}.pt", weights_only=False)
        for step, ((loss, norm, *_), (rloss, rnorm)) in enumerate(zip(res["metrics"], ref["losses"])):
            if abs(loss - rloss) > rtol * abs(rloss):
                problems.append(f"{tag} rank {r} step {step}: loss {loss!r} vs reference {rloss!r}")
            if abs(norm - rnorm) > max(rtol * abs(rnorm), 1e-12):
                problems.append(f"{tag} rank {r} step {step}: grad norm {norm!r} vs reference {rnorm!r}")
        for name, (t, start) in (res["params"] if "params" in ref else {}).items():
            full = ref["params"][name]
            want = full[start : start + t.shape[0]] if start or t.shape != full.shape else full
            if t.shape != want.shape:
                problems.append(f"{tag} rank {r}: {name} shape {tuple(t.shape)} vs {tuple(want.shape)}")
            elif rel(t, want) > rtol:
                problems.append(f"{tag} rank {r}: {name} differs, relative {rel(t, want):.2e}")
        for slot, b in (res["biases"] if "biases" in ref else {}).items():
            if not torch.equal(b, ref["biases"][slot]):
                problems.append(f"{tag} rank {r}: bias of router slot {slot} differs: {b} vs {ref['biases'][slot]}")
    return problems


# ------------------------------------------------------------------------------------------------
# checkpoints across layouts


def checkpoint_worker(
    rank: int,
    world: int,
    cfg: ModelConfig,
    spec: LayoutSpec,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    micro_batch_size: int,
    mtp_weight: float,
    optim: OptimSettings,
    seed: int,
    outdir: str,
    first_step: int,
    load_from: str | None,
    save_to: str | None,
) -> None:
    """Train `batches` (global steps first_step, first_step+1, ...) under `spec` on `world` ranks,
    after loading the training state from `load_from` (a step folder of any layout) if given, and
    save it into the checkpoint folder `save_to` at the end. Losses go to `outdir/<tag>.rank<r>.pt`."""
    from megads.checkpoint.state import load_training_state, training_entries
    from megads.checkpoint.writer import CheckpointWriter

    plan = plan_spec(cfg, spec, world=world)
    mesh = ParallelMesh.build(plan)
    ex = ParallelExecutor(
        cfg, mesh=mesh, plan=plan, schedule=spec.schedule, micro_batch_size=micro_batch_size, seed=seed,
        optim=optim, zero1=spec.zero1, init=load_from is None,
    )
    step = first_step
    if load_from is not None:
        state = load_training_state(load_from, ex)
        assert state["step"] == first_step, (state["step"], first_step)
    metrics = []
    for ids, labels in batches:
        m = ex.step(ids, labels, mtp_weight=mtp_weight)
        metrics.append((m.loss, m.grad_norm, m.lm, m.mtp, m.balance, m.extras))
        step += 1
    if save_to is not None:
        writer = CheckpointWriter(Path(save_to), keep_last=0)
        writer.save(step, training_entries(ex, step=step, tokens=0.0, loader_state={"windows": step}),
                    meta={"step": step, "tokens": 0.0, "world_size": world})
        writer.wait()
    result = {"rank": rank, "mesh": mesh.describe(), "metrics": metrics, "params": ex.global_named_parameters(),
              "biases": ex.biases()}
    path = Path(outdir) / f"{spec.tag}.rank{rank}.pt"
    torch.save(result, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def losses_and_reduced_grads(
    ex: ParallelExecutor, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], *, mtp_weight: float = 0.3
) -> tuple[list[float], list[list[torch.Tensor]]]:
    """Per step of `batches`: the global loss and copies of the reduced gradient shards (ZeRO-1
    keeps them until the next step): what two executions of the same steps must agree on."""
    losses, grads = [], []
    for ids, labels in batches:
        losses.append(ex.step(ids, labels, mtp_weight=mtp_weight).loss)
        grads.append([sp.grad_buf.clone() for sp in ex.optimizer.spaces])
    return losses, grads


def assert_same_steps(
    ref: tuple[list[float], list[list[torch.Tensor]]], got: tuple[list[float], list[list[torch.Tensor]]],
    *, rel: float = 1e-6,
) -> None:
    """`losses_and_reduced_grads` results within `rel`: losses relative, each gradient space
    relative to its largest element."""
    (l0, g0), (l1, g1) = ref, got
    assert len(l0) == len(l1) and all(abs(a - b) <= rel * abs(a) for a, b in zip(l0, l1)), (l0, l1)
    for step, (s0, s1) in enumerate(zip(g0, g1)):
        for space, (a, b) in enumerate(zip(s0, s1)):
            scale = a.abs().max()
            assert scale > 0 and (b - a).abs().max() <= rel * scale, (
                f"step {step}, gradient space {space}: differs by {float((b - a).abs().max() / scale):.2e} "
                f"of its scale (limit {rel:.0e})")

