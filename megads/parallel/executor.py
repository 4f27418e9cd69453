"""One training step on a (pp, ep, dp) mesh: data split, pipeline schedule, ZeRO-1, expert bias.

Parallelism is applied to the single-device model in one fixed order:

    1. plan_layout (numbers only)  2. ParallelMesh.build (groups)
    3. build_stage_model (this rank's pieces and expert shard only, built on the meta device)
    3b. compile (optional, per block piece), then recompute (optional)
    4. shard_experts (ep: the all-to-all dispatchers)          5. DeepseekStage (overlap_fb chooses the segmented F&B) + PipelineRuntime
    6. Zero1AdamW (dp / edp / embed groups)

A step on the global batch [G, T]: data-parallel replica d of R = dp/cp takes rows
[d*G/R, (d+1)*G/R) and cuts them into M = G/(R*micro_batch_size) micro-batches; every pipeline
rank of the replica gets the same list (the first stage reads the tokens, the last the labels
and MTP tokens), and so does every cp rank, which runs its rows of each sequence
(megads.parallel.context_parallel: 4b. the routers' sequence sums over the cp group). The
runtime runs the schedule; ZeRO-1 reduces, clips over every group, updates and all-gathers; the
expert-load counts of every router are summed over the world (each layer lives on one stage, so
the world sum is the dp sum of that stage) and drive the auxiliary-loss-free bias update, the
same on every replica. The global loss parts are world sums of the per-rank sums / (M*dp).

Shapes: G global batch sequences, T sequence, E routed experts, R router slots (layers + MTP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megads.model.balance import LoadStats, routers, update_expert_bias
from megads.model.config import ModelConfig
from megads.model.linear import LinearFactory
from megads.model.recompute import apply_recompute
from megads.model.router import Router
from megads.parallel.compile import apply_compile
from megads.parallel.context_parallel import ContextParallel, apply_context_parallel
from megads.parallel.expert_parallel import AllToAllDispatcher, moe_modules, shard_experts
from megads.parallel.mesh import LayoutPlan, ParallelMesh
from megads.parallel.stages import DeepseekStage, build_stage_model, embedding_ranks, piece_specs, rank_pieces
from megads.parallel.zero1 import Zero1AdamW
from megads.pipeline.actions import Layout, Op
from megads.pipeline.runtime import PipelineRuntime
from megads.pipeline.schedules import build_schedule, min_microbatches


@dataclass
class OptimSettings:
    """AdamW and balancing hyper-parameters the executor needs (from the trainer's optim config)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    bias_update_speed: float = 1e-3  # gamma of the auxiliary-loss-free balancing
    bucket_numel: int = 1 << 22


MicroBatch = dict[str, torch.Tensor]  # {"input_ids": [mb, T], "labels": [mb, T]}


@dataclass
class StepMetrics:
    """Global figures of one optimizer step (the same on every rank).

    Loss parts are means over every micro-batch of every data-parallel rank; `grad_norm` is the
    global norm before clipping; `expert_load` holds each router's global load by module name
    (as in the single-process model), `expert_load_RE` the same counts as one [R, E] table.
    """

    loss: float  # total: lm + lambda*mtp + balance
    lm: float
    mtp: float
    balance: float
    grad_norm: float
    tokens: int  # tokens in the global batch
    micro_batches: int  # micro-batches per data-parallel rank
    expert_load_RE: torch.Tensor
    expert_load: dict[str, LoadStats] = field(default_factory=dict)
    skipped: bool = False  # non-finite loss or gradient norm: no update on any rank
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def load_imbalance(self) -> float:
        """Mean over routers of max/mean expert load (0 without MoE layers)."""
        vals = [s.imbalance for s in self.expert_load.values()]
        return sum(vals) / len(vals) if vals else 0.0


def router_slots(model: nn.Module, *, cfg: ModelConfig) -> dict[int, Router]:
    """Router of each slot this rank holds: slot i = layer i, slot L+k = MTP depth k+1."""
    slots: dict[int, Router] = {}
    for name, layer in model.layers.items():  # type: ignore[union-attr]
        if isinstance(getattr(layer.mlp, "gate", None), Router):
            slots[int(name)] = layer.mlp.gate
    if getattr(model, "mtp", None):
        for k, mod in model.mtp.items():  # type: ignore[union-attr]
            if isinstance(getattr(mod.block.mlp, "gate", None), Router):
                slots[cfg.num_hidden_layers + int(k)] = mod.block.mlp.gate
    return slots


def global_router_names(cfg: ModelConfig) -> dict[str, int]:
    """Module name of every router of the whole model (as in the single-process model) -> slot."""
    names = {f"layers.{i}.mlp.gate": i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)}
    for k in range(cfg.num_nextn_predict_layers):
        if cfg.is_moe_layer(cfg.num_hidden_layers + k):
            names[f"mtp.{k}.block.mlp.gate"] = cfg.num_hidden_layers + k
    return names


def splits_backward(schedule: str, *, pp: int) -> bool:
    """Whether `schedule` on pp ranks runs B/W-split backwards (B and W actions: the GEMMs' weight
    gradients deferred), at its smallest micro-batch count and twice that."""
    if pp == 1:
        return False
    n = min_microbatches(schedule, pp=pp)
    return any(a.op in (Op.B, Op.W) for m in (n, 2 * n)
               for acts in build_schedule(schedule, pp=pp, num_microbatches=m).actions for a in acts)


class ParallelExecutor:
    """Builds this rank's share of the model and runs training steps on the mesh."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        mesh: ParallelMesh,
        plan: LayoutPlan,
        schedule: str = "1f1b",
        micro_batch_size: int = 1,
        seed: int = 0,
        optim: OptimSettings | None = None,
        zero1: bool = True,
        moments_dtype: torch.dtype = torch.float32,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        param_groups_fn: Any = None,
        autocast_dtype: torch.dtype | None = None,
        overlap_fb: bool = False,
        stage_cls: type[DeepseekStage] = DeepseekStage,
        init: bool = True,
        loss_chunk_tokens: int = 0,
        recompute: str = "none",
        linear_factory: LinearFactory | None = None,
        compile: bool | str = False,
    ) -> None:
        """`overlap_fb`: the stage cuts its graph at the expert all-to-alls and its F&B actions
        overlap them with the other chunk's compute (`DeepseekStage(overlap=True)`); `stage_cls`
        lets a tool run a subclass of the stage (the overlap benchmark's sequential peer). `init`:
        see `build_stage_model` (False: uninitialised parameters, for a load or a measurement).
        `loss_chunk_tokens`: the cross entropies in chunks (megads.model.loss; 0 = whole);
        `recompute`: activation recomputation none | selective | full (megads.model.recompute).
        `linear_factory`: the backend of every GEMM layer (megads.model.linear; FP8: megads.model.fp8).
        `compile`: torch.compile every transformer block's pieces (megads.parallel.compile); True
        is the inductor backend, a string names another (the tests' `aot_eager`)."""
        self.cfg = cfg
        self.overlap_fb = overlap_fb
        self.stage_cls = stage_cls
        self.mesh = mesh
        self.plan = plan
        self.schedule_name = schedule
        self.micro_batch_size = micro_batch_size
        self.optim_settings = optim or OptimSettings()
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        layout = self._layout(num_microbatches=1)
        if layout.num_pieces != len(plan.stage_layers):
            raise ValueError(
                f"schedule {schedule!r} places {layout.num_pieces} pieces but the plan has "
                f"{len(plan.stage_layers)} stage layer counts; plan with pieces_per_rank="
                f"{layout.num_pieces // plan.pp}"
            )
        specs_all = piece_specs(plan.stage_layers)
        self.specs = [specs_all[p] for p in rank_pieces(layout, rank=mesh.pp_rank)]
        self.model = build_stage_model(cfg, specs=self.specs, seed=seed, dtype=dtype, device=self.device,
                                       ep_size=mesh.ep, ep_rank=mesh.ep_rank, init=init, factory=linear_factory)
        self.model.loss_chunk_tokens = loss_chunk_tokens
        if compile and mesh.cp > 1:
            raise ValueError(f"compile with context parallel (cp={mesh.cp}) is not supported yet: the attention's "
                             "latent all-gather is not compiled; run it eager (compile=False)")
        if compile:  # before recompute: the checkpointed pieces are then the compiled ones
            apply_compile(self.model, backend="inductor" if compile is True else compile,
                          eager_gemms=splits_backward(schedule, pp=plan.pp))
        apply_recompute(self.model, recompute)
        self.context = (ContextParallel(group=mesh.cp_group, size=mesh.cp, rank=mesh.cp_rank)
                        if mesh.cp > 1 else None)
        if self.context is not None:
            apply_context_parallel(self.model, self.context)
        self.expert_names = expert_names = set(
            shard_experts(self.model, group=mesh.ep_group, ep_size=mesh.ep, ep_rank=mesh.ep_rank,
                          ranks_per_node=plan.ranks_per_node,
                          row_codec=linear_factory.dispatch_codec() if linear_factory is not None else None)
        )
        self.slots = router_slots(self.model, cfg=cfg)
        self.slot_names = {name: slot for slot, r in self.slots.items() for name, rr in routers(self.model).items() if rr is r}
        first_rank, last_rank = embedding_ranks(layout)
        first_ranks, last_ranks = set(layout.piece_ranks(0)), set(layout.piece_ranks(layout.num_pieces - 1))
        # Replicated pieces (DualPipe): each rank pair holds both ends of the model, the replica
        # sync sums their gradients, and no separate embedding tie is needed.
        self.replicas = max(len(layout.piece_ranks(p)) for p in range(layout.num_pieces))
        tied: list[torch.Tensor] = []
        if first_ranks != last_ranks and self.model.embed_tokens is not None:
            tied = [self.model.embed_tokens.weight]
        named = dict(self.model.named_parameters())
        experts = [p for n, p in named.items() if n in expert_names]
        groups = param_groups_fn(self.model) if param_groups_fn is not None else [{"params": list(named.values())}]
        o = self.optim_settings
        self.optimizer = Zero1AdamW(
            groups,
            lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
            dp_group=mesh.dp_group, edp_group=mesh.edp_group, embed_group=mesh.embed_group,
            norm_group=mesh.world_group, expert_params=experts, tied_params=tied,
            count_tied_in_norm=mesh.pp_rank == first_rank, norm_weight=1.0 / self.replicas,
            max_grad_norm=o.max_grad_norm,
            moments_dtype=moments_dtype, bucket_numel=o.bucket_numel, shard=zero1,
            param_names={id(p): n for n, p in named.items()},  # global names: checkpoints reshard by them
        )
        self._runtimes: dict[int, tuple[PipelineRuntime, DeepseekStage]] = {}
        # Set by the trainer for one step: the runtime records per-action times (save_timeline_png).
        self.record_next_step = False
        self.last_step_result: Any = None

    # ------------------------------------------------------------------ schedule
    def _layout(self, *, num_microbatches: int) -> Layout:
        n = max(num_microbatches, min_microbatches(self.schedule_name, pp=self.plan.pp))
        return build_schedule(self.schedule_name, pp=self.plan.pp, num_microbatches=n).layout

    def _runtime(self, num_microbatches: int, *, mtp_weight: float) -> tuple[PipelineRuntime, DeepseekStage]:
        if num_microbatches not in self._runtimes:
            sched = build_schedule(self.schedule_name, pp=self.plan.pp, num_microbatches=num_microbatches)
            stage = self.stage_cls(
                self.model, layout=sched.layout, rank=self.mesh.pp_rank, specs=self.specs, pp_group=self.mesh.pp_group,
                # the gradient sum over the dp group: a sum over the cp ranks of a sequence (their
                # losses add up to its loss), a mean over the dp/cp replicas
                mtp_weight=mtp_weight, grad_scale=1.0 / self.mesh.data_parallel, device=self.device,
                autocast_dtype=self.autocast_dtype, overlap=self.overlap_fb, context=self.context,
            )
            counts: dict[int, int] = {}
            for c in sched.layout.chunks_on(self.mesh.pp_rank):
                for p in stage.chunk_parameters(c):
                    counts[id(p)] = counts.get(id(p), 0) + 1
            self.optimizer.expect_ready_marks(counts)
            if self.replicas == 1:  # with replicas, gradients are final only after the replica sync
                stage.on_chunk_grads_final = self.optimizer.mark_ready
            rt = PipelineRuntime(sched, stage=stage, rank=self.mesh.pp_rank, group=self.mesh.pp_group)
            self._runtimes[num_microbatches] = (rt, stage)
        rt, stage = self._runtimes[num_microbatches]
        stage.mtp_weight = mtp_weight
        return rt, stage

    # ------------------------------------------------------------------ step
    def split_batch(self, input_ids_GT: torch.Tensor, labels_GT: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        G = input_ids_GT.shape[0]
        dp, mbs = self.mesh.data_parallel, self.micro_batch_size  # the cp ranks of a replica share its rows
        if G % (dp * mbs):
            raise ValueError(
                f"global batch of {G} sequences is not divisible by dp/cp={dp} x parallel.micro_batch_size={mbs}; "
                f"use a multiple of {dp * mbs}"
            )
        per = G // dp
        lo = self.mesh.data_rank * per
        ids, labels = input_ids_GT[lo : lo + per], labels_GT[lo : lo + per]
        return [(ids[i : i + mbs], labels[i : i + mbs]) for i in range(0, per, mbs)]

    def step(
        self, input_ids_GT: torch.Tensor, labels_GT: torch.Tensor, *, mtp_weight: float, lr: float | None = None
    ) -> StepMetrics:
        """Forward/backward of the global batch, optimizer step, bias update; same call on every rank."""
        return self.run_microbatches(self.split_batch(input_ids_GT, labels_GT), mtp_weight=mtp_weight, lr=lr)

    def run(
        self, micro_batches: Sequence[MicroBatch], *, lr: float, mtp_weight: float, bias_update_speed: float
    ) -> StepMetrics:
        """The trainer's step: this data-parallel rank's micro-batches -> one optimizer update.

        Every pipeline rank of a data-parallel replica must be given the same micro-batches.
        """
        self.optim_settings.bias_update_speed = bias_update_speed
        mbs = [(mb["input_ids"], mb["labels"]) for mb in micro_batches]
        return self.run_microbatches(mbs, mtp_weight=mtp_weight, lr=lr)

    def run_microbatches(
        self, mbs: Sequence[tuple[torch.Tensor, torch.Tensor]], *, mtp_weight: float, lr: float | None = None
    ) -> StepMetrics:
        self.model.train()
        rt, stage = self._runtime(len(mbs), mtp_weight=mtp_weight)
        for d in self._dispatchers():
            d.reset_volume()
        if self.context is not None:
            self.context.reset_volume()
        rt.record_timeline = self.record_next_step
        self.last_step_result = rt.step(mbs)
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        tokens = sum(int(ids.numel()) for ids, _ in mbs)
        ds = self._dispatchers()
        res = self.last_step_result
        # world sums, in the one reduction of the step: tokens, dispatch bytes, exposed all-to-all
        # seconds, nodes reached and tokens dispatched (node-limited routing), busy and wall seconds
        extra = [float(tokens) if self.mesh.is_first_stage and self.mesh.cp_rank == 0 else 0.0, float(sum(d.sent_bytes for d in ds)),
                 sum(d.wait_s for d in ds), float(sum(d.nodes_reached_sum for d in ds)),
                 float(sum(d.tokens_dispatched for d in ds)), res.busy_s, res.wall_s]
        stats = torch.cat([stage.stats, torch.tensor(extra, dtype=torch.float64)]).to(self.device)
        dist.all_reduce(stats, group=self.mesh.world_group)
        stats = stats.cpu()
        a2a_bytes, a2a_wait, nodes_sum, dispatched, busy, wall = stats[4:10].tolist()
        max_nodes = max([d.max_nodes_per_token for d in ds], default=0)
        if ds and ds[0].ranks_per_node < ds[0].ep_size:  # node-limited routing: the world's most (same on all ranks)
            most = torch.tensor([max_nodes], dtype=torch.float64, device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.mesh.world_group)
            max_nodes = int(most.item())
        denom = len(mbs) * self.mesh.data_parallel  # (the cp ranks' parts add up to a micro-batch's loss)
        lm, mtp, bal = (stats[:3] / denom).tolist()
        total = lm + bal + (mtp_weight * mtp if mtp_weight > 0 and self.cfg.num_nextn_predict_layers > 0 else 0.0)
        # a non-finite global loss or gradient norm skips the update on every rank alike (both
        # are world reductions), and the expert-bias update with it
        grad_norm = self.optimizer.step(skip=not math.isfinite(total))
        skipped = self.optimizer.last_step_skipped
        self.optimizer.zero_grad(set_to_none=True)
        load_RE = self._update_biases(apply=not skipped)
        load = {}
        for name, slot in global_router_names(self.cfg).items():
            c = load_RE[slot]
            load[name] = LoadStats(max=float(c.max()), mean=float(c.mean()), min=float(c.min()), counts=c)
        return StepMetrics(
            loss=total, lm=lm, mtp=mtp, balance=bal, grad_norm=grad_norm,
            tokens=int(stats[3]), micro_batches=len(mbs), expert_load_RE=load_RE, expert_load=load, skipped=skipped,
            extras={"a2a_rows_sent": sum(d.sent_rows for d in ds),
                    "a2a_remote_rows_sent": sum(d.sent_remote_rows for d in ds),
                    "a2a_bytes": a2a_bytes,  # dispatch bytes sent by all ranks in the step
                    # latent (and latent-gradient) bytes this rank sent in the cp exchanges of the step
                    "cp_bytes": self.context.sent_bytes if self.context is not None else 0,
                    "a2a_wait_s": a2a_wait / self.mesh.world_size,  # mean per rank: the part not hidden
                    "nodes_per_token_mean": nodes_sum / dispatched if dispatched else 0.0,
                    "max_nodes_per_token": max_nodes,
                    # idle share of the step's wall time, mean over ranks (pipeline bubble + waits)
                    "bubble_fraction": max(0.0, 1.0 - busy / wall) if wall > 0 else 0.0},
        )

    def save_timeline_png(self, path: str, *, title: str) -> str | None:
        """Draw the last recorded step's per-rank timeline (collective over the pipeline group).

        Every data-parallel replica runs the same schedule; replica 0's picture goes to `path`
        (returned on the rank that wrote it), the other replicas draw to a discarded file.
        """
        import os
        import tempfile

        from megads.pipeline.render import save_step_png

        if self.last_step_result is None or not self.last_step_result.timeline:
            return None
        if self.mesh.dp_rank == 0:
            out = save_step_png(self.last_step_result, path=path, title=title, group=self.mesh.pp_group)
            return str(out) if out is not None else None
        fd, scratch = tempfile.mkstemp(suffix=".png")
        os.close(fd)
        try:
            save_step_png(self.last_step_result, path=scratch, title=title, group=self.mesh.pp_group)
        finally:
            os.unlink(scratch)
        return None

    def _dispatchers(self) -> list[AllToAllDispatcher]:
        return [m.dispatcher for m in moe_modules(self.model) if isinstance(m.dispatcher, AllToAllDispatcher)]

    @torch.no_grad()
    def _update_biases(self, *, apply: bool = True) -> torch.Tensor:
        """`megads.model.balance.update_expert_bias` with one world all-reduce of [R, E] counts
        (`apply=False`, a skipped step: the counts are summed and reset, the biases stay).

        This rank's routers fill their slots of a world-sized [R, E] table; the world sum is the
        dp sum for each slot (each router lives on one stage), so every stage gets the counts of
        its own routers for the bias update and rank 0 gets the load of every layer for logging.
        """
        R = self.cfg.num_hidden_layers + self.cfg.num_nextn_predict_layers
        load_RE = torch.zeros(R, max(1, self.cfg.n_routed_experts), dtype=torch.float32, device=self.device)
        names = list(routers(self.model))
        rows = [self.slot_names[n] for n in names]

        def all_reduce(counts_rE: torch.Tensor) -> None:
            load_RE[rows] = counts_rE.to(load_RE.device)
            dist.all_reduce(load_RE, group=self.mesh.world_group)
            counts_rE.copy_(load_RE[rows])

        if names:
            gamma = self.optim_settings.bias_update_speed if apply else 0.0
            update_expert_bias(self.model, gamma=gamma, all_reduce=all_reduce)
        else:
            dist.all_reduce(load_RE, group=self.mesh.world_group)
        return load_RE.cpu()

    # ------------------------------------------------------------------ introspection
    def describe(self) -> str:
        """One line about what this rank holds (each rank logs its own)."""
        m = self.model
        layers = [int(k) for k in m.layers.keys()]  # type: ignore[union-attr]
        parts = [f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"]
        if m.embed_tokens is not None:
            parts.append("embedding")
        if m.lm_head is not None:
            parts.append("head + MTP" if m.mtp else "head")
        n = sum(p.numel() for p in m.parameters())
        experts = self.cfg.n_routed_experts // self.mesh.ep if self.cfg.n_routed_experts else 0
        return (
            f"{self.mesh.describe()}: {', '.join(parts)}; {n / 1e6:.2f}M parameters "
            f"({experts} of {self.cfg.n_routed_experts} routed experts per MoE layer); optimizer state "
            f"{self.optimizer.state_bytes() / 2**20:.1f} MiB ({'ZeRO-1' if self.optimizer.shard else 'replicated'})"
        )

    def global_named_parameters(self) -> dict[str, tuple[torch.Tensor, int]]:
        """name -> (tensor, first global expert index of the slice along dim 0; 0 for non-experts)."""
        out: dict[str, tuple[torch.Tensor, int]] = {}
        for name, p in self.model.named_parameters():
            start = 0
            if ".experts." in name and self.mesh.ep > 1:
                start = self.mesh.ep_rank * p.shape[0]
            out[name] = (p.detach(), start)
        return out

    def biases(self) -> dict[int, torch.Tensor]:
        return {slot: r.e_score_correction_bias.detach().clone() for slot, r in self.slots.items()}
