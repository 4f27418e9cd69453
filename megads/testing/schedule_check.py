"""Exactness check of every pipeline schedule on the DeepSeek model against one process.

A case is (pp, ep, schedule, overlap) plus the micro-batch counts of its optimizer steps (one
count per step, so a run covers several counts, the schedule's minimum included). The worker
runs all cases one after the other inside one spawned gloo group (start-up dominates on a small
machine); per step it records the global loss and, just before the ZeRO-1 step, each parameter's
full gradient (summed over the data-parallel group for dense parameters, the expert-data-parallel
group for routed experts, and the embed group for the embedding copy of the last stage), and
after the run the updated parameters. `reference_with_grads` does the same steps on one process
(micro-batches of the same size, `torch.optim.AdamW`, `clip_grad_norm_` with a float64 total) and `compare_case`
checks losses, gradients and parameters slice by slice within a relative tolerance.

Shapes: G global batch sequences, T sequence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megads.model.balance import update_expert_bias
from megads.model.config import ModelConfig
from megads.parallel.config import pieces_per_rank
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.testing.parallel import clip_grad_norm_fp64, reference_model_and_optimizer


@dataclass(frozen=True)
class ScheduleCase:
    pp: int
    ep: int
    schedule: str
    overlap: bool
    microbatches: tuple[int, ...]  # per-dp-rank micro-batch count of each optimizer step
    compile: str | None = None  # torch.compile backend of the blocks (megads.parallel.compile); None: eager

    @property
    def tag(self) -> str:
        mbs = "-".join(map(str, self.microbatches))
        compiled = f"_compile-{self.compile}" if self.compile else ""
        return f"pp{self.pp}_ep{self.ep}_{self.schedule}{'_overlap' if self.overlap else ''}{compiled}_m{mbs}"

    def global_batches(self, world: int) -> tuple[int, ...]:
        """Sequences per step (micro-batch size 1): M per dp rank times dp."""
        return tuple(m * (world // self.pp) for m in self.microbatches)


def make_step_batches(
    cfg: ModelConfig, *, sizes: Sequence[int], seq_len: int, seed: int = 1234
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One random (input_ids_GT, labels_GT) batch per step, step i with sizes[i] sequences."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for G in sizes:
        tok = torch.randint(0, cfg.vocab_size, (G, seq_len + 1), generator=g)
        out.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    return out


def reference_with_grads(
    cfg: ModelConfig,
    *,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    mtp_weight: float,
    optim: OptimSettings,
    seed: int,
) -> dict[str, Any]:
    """The steps on one process, micro-batches of one sequence; gradients recorded before clipping."""
    model, opt = reference_model_and_optimizer(cfg, optim=optim, seed=seed)
    losses, grads = [], []
    for ids_GT, labels_GT in batches:
        M = ids_GT.shape[0]
        total = 0.0
        for i in range(M):
            out = model.compute_loss(ids_GT[i : i + 1], labels_GT[i : i + 1], mtp_weight=mtp_weight)
            (out.total / M).backward()
            total += float(out.total.detach()) / M
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        clip_grad_norm_fp64(model.parameters(), optim.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_expert_bias(model, gamma=optim.bias_update_speed)
        losses.append(total)
    return {"losses": losses, "grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def _is_expert(name: str) -> bool:
    """Routed-expert parameters (sharded over ep, summed over edp); not the shared experts."""
    return ".experts." in f".{name}"


def _reduced_grads(ex: ParallelExecutor) -> dict[str, torch.Tensor]:
    """Full gradients of this rank's parameters (the sums ZeRO-1 would form), before its step."""
    mesh = ex.mesh
    layout = ex._layout(num_microbatches=1)
    tied = set(layout.piece_ranks(0)) != set(layout.piece_ranks(layout.num_pieces - 1))
    out: dict[str, torch.Tensor] = {}
    for name, p in ex.model.named_parameters():
        g = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=mesh.edp_group if _is_expert(name) else mesh.dp_group)
        if tied and name == "embed_tokens.weight" and mesh.embed_group is not None:
            dist.all_reduce(g, group=mesh.embed_group)
        out[name] = g
    return out


def schedule_worker(
    rank: int,
    world: int,
    cfg: ModelConfig,
    cases: Sequence[ScheduleCase],
    batches_by_case: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    mtp_weight: float,
    optim: OptimSettings,
    seed: int,
    outdir: str,
) -> None:
    """Run every case on this rank; write `outdir/<tag>.rank<r>.pt` (see the module docstring)."""
    for case in cases:
        plan = plan_layout(
            world_size=world, pp=case.pp, ep=case.ep, num_layers=cfg.num_hidden_layers,
            n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group,
            pieces_per_rank=pieces_per_rank(case.schedule),
        )
        mesh = ParallelMesh.build(plan)
        ex = ParallelExecutor(cfg, mesh=mesh, plan=plan, schedule=case.schedule, micro_batch_size=1, seed=seed,
                              optim=optim, overlap_fb=case.overlap, compile=case.compile or False)
        grads: list[dict[str, torch.Tensor]] = []
        step_fn = ex.optimizer.step

        def capture_then_step(
            *a: Any, _ex: ParallelExecutor = ex, _step: Any = step_fn, _out: list[Any] = grads, **k: Any
        ) -> Any:
            _out.append(_reduced_grads(_ex))
            return _step(*a, **k)

        ex.optimizer.step = capture_then_step  # type: ignore[method-assign]
        losses = []
        for ids, labels in batches_by_case[case.tag]:
            m = ex.step(ids, labels, mtp_weight=mtp_weight)
            losses.append(m.loss)
        starts = {n: s for n, (_, s) in ex.global_named_parameters().items()}
        result = {
            "losses": losses,
            "grads": [{n: (g, starts[n]) for n, g in step.items()} for step in grads],
            "params": ex.global_named_parameters(),
        }
        path = Path(outdir) / f"{case.tag}.rank{rank}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(result, tmp)
        os.replace(tmp, path)
        dist.barrier()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / (b.double().norm() + 1e-30))


def compare_case(ref: dict[str, Any], *, outdir: str | Path, tag: str, world: int, rtol: float) -> tuple[list[str], float]:
    """Problems found (empty: exact within rtol) and the largest relative difference seen."""
    problems: list[str] = []
    worst = 0.0

    def check(what: str, t: torch.Tensor, start: int, full: torch.Tensor) -> None:
        nonlocal worst
        want = full[start : start + t.shape[0]] if start or t.shape != full.shape else full
        if t.shape != want.shape:
            problems.append(f"{tag} {what}: shape {tuple(t.shape)} vs {tuple(want.shape)}")
            return
        r = _rel(t, want)
        worst = max(worst, r)
        if r > rtol:
            problems.append(f"{tag} {what}: relative difference {r:.2e}")

    for r in range(world):
        res = torch.load(Path(outdir) / f"{tag}.rank{r}.pt", weights_only=False)
        if len(res["losses"]) != len(ref["losses"]) or len(res["grads"]) != len(ref["grads"]):
            problems.append(f"{tag} rank {r}: {len(res['losses'])} steps vs {len(ref['losses'])}")
            continue
        for step, (loss, rloss) in enumerate(zip(res["losses"], ref["losses"])):
            d = abs(loss - rloss) / abs(rloss)
            worst = max(worst, d)
            if d > rtol:
                problems.append(f"{tag} rank {r} step {step}: loss {loss!r} vs reference {rloss!r}")
        for step, (got, want) in enumerate(zip(res["grads"], ref["grads"])):
            for name, (g, start) in got.items():
                full = want.get(name)
                if full is None:
                    if g.abs().max() > 0:
                        problems.append(f"{tag} rank {r} step {step}: gradient of {name} where the reference has none")
                    continue
                check(f"rank {r} step {step} grad {name}", g, start, full)
        for name, (t, start) in res["params"].items():
            check(f"rank {r} param {name}", t, start, ref["params"][name])
    return problems, worst


def make_stage(
    model: Any,
    *,
    layout: Any,
    specs: Sequence[Any],
    overlap: bool,
    autocast_dtype: torch.dtype | None = None,
    mtp_weight: float = 0.3,
    grad_scale: float = 1.0,
) -> Any:
    """The one-rank stage of `model` (pp rank 0), with or without the overlapped F&B."""
    from megads.parallel.stages import DeepseekStage

    return DeepseekStage(model, layout=layout, rank=0, specs=specs, mtp_weight=mtp_weight, grad_scale=grad_scale,
                         autocast_dtype=autocast_dtype, overlap=overlap)


def overlap_order_worker(rank: int, world: int, cfg: ModelConfig, outpath: str) -> None:
    """One rank, ep group of one: `DeepseekStage` (F, F, BW, BW) against `DeepseekStage(overlap=True)`
    (F, F&B, BW) on the same micro-batches, and the issue order of the all-to-alls inside F&B.

    Writes {"y_plain", "y_overlap", "grads_plain", "grads_overlap", "events"} to `outpath`; events are
    "fwd" (dispatcher.dispatch_start / combine_start) or "bwd" (dispatcher.dispatch_backward_start /
    combine_backward_start, the reverse all-to-alls of the backward).
    """
    from megads.parallel.expert_parallel import AllToAllDispatcher, moe_modules
    from megads.parallel.stages import build_stage_model, piece_specs
    from megads.pipeline.schedules import build_schedule
    from megads.pipeline.stage import BackwardArgs, ForwardArgs

    sched = build_schedule("1f1b", pp=1, num_microbatches=2)
    specs = piece_specs([cfg.num_hidden_layers])
    g = torch.Generator().manual_seed(5)
    mbs = []
    for _ in range(2):
        tok = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
        mbs.append((tok[:, :-1].contiguous(), tok[:, 1:].contiguous()))
    events: list[str] = []
    grad_y = torch.tensor(0.5)
    out: dict[str, Any] = {}
    for kind in ("plain", "overlap"):
        model = build_stage_model(cfg, specs=specs, seed=3)
        model.train()
        for moe in moe_modules(model):
            moe.dispatcher = AllToAllDispatcher(cfg.n_routed_experts, group=None, ep_size=1, ep_rank=0)
        stage = make_stage(model, layout=sched.layout, specs=specs, overlap=kind == "overlap")
        stage.begin_step(microbatches=mbs, num_microbatches=2)
        y0 = stage.forward(0, 0, None)
        if kind == "plain":
            y1 = stage.forward(0, 1, None)
            stage.backward_full(0, 0, grad_y)
        else:
            for d in moe_modules(model):
                for name, ev in (("dispatch_start", "fwd"), ("combine_start", "fwd"),
                                 ("dispatch_backward_start", "bwd"), ("combine_backward_start", "bwd")):
                    orig = getattr(d.dispatcher, name)

                    def logged(*a: Any, _o: Any = orig, _ev: str = ev, **k: Any) -> Any:
                        events.append(_ev)
                        return _o(*a, **k)

                    setattr(d.dispatcher, name, logged)
            y1, _ = stage.forward_backward_overlapped(ForwardArgs(0, 1, None), BackwardArgs(0, 0, grad_y))
            for d in moe_modules(model):  # back to the class's methods
                for name in ("dispatch_start", "combine_start", "dispatch_backward_start", "combine_backward_start"):
                    delattr(d.dispatcher, name)
        stage.backward_full(0, 1, grad_y)
        stage.end_step()
        out[f"y_{kind}"] = (y0.detach(), y1.detach())
        out[f"grads_{kind}"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    out["events"] = events
    torch.save(out, outpath)
