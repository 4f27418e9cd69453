"""Parallel layout configuration (Hydra group `parallel`).

The contract between the trainer and `megads.parallel`: the trainer reads these fields,
`validate()` runs before any process group exists (with the layout checks of
`megads.parallel.mesh.plan_layout`), and the one step executor
(`megads.parallel.executor.ParallelExecutor`) honours every field. pp = 1 is no pipelining:
`schedule` then plays no part.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megads.pipeline.schedules import get_schedule, schedule_names

_BACKENDS = ("auto", "nccl", "gloo")
_MOMENT_DTYPES = ("float32", "bfloat16")


def pieces_per_rank(schedule: str) -> int:
    """Model pieces one pipeline rank holds under `schedule`, from the schedule registry: 2 for
    DualPipeV's V and interleaved 1F1B, else 1 (DualPipe's two chunks are replicas of the same pp
    pieces). ValueError for a schedule that is not registered."""
    return get_schedule(schedule).pieces_per_rank


@dataclass
class ParallelConfig:
    pp: int = 1  # pipeline-parallel stages
    ep: int = 1  # expert-parallel degree (routed experts sharded over ep ranks)
    # context parallel: each sequence split over cp ranks of a stage (zig-zag chunks; MLA exchanges
    # its compressed latent, megads.parallel.context_parallel); a stage may raise it for long sequences
    cp: int = 1
    schedule: str = "1f1b"  # pipeline schedule
    micro_batch_size: int = 1  # sequences per micro-batch on one rank
    stage_layers: list[int] | None = None  # explicit transformer layers per pipeline stage
    zero1: bool = True  # shard optimizer state over the data-parallel group
    moments_dtype: str = "float32"  # AdamW moment storage: float32 | bfloat16
    backend: str = "auto"  # auto = nccl on GPU, gloo on CPU
    # Node-limited routing (SPEC.md: M = 4): the most nodes one token's experts may span. Checked
    # against model.n_group / topk_group when an expert-parallel group spans several nodes.
    node_limit: int = 4
    ranks_per_node: int | None = None  # None: LOCAL_WORLD_SIZE / SLURM tasks per node, else the world
    bucket_numel: int = 4_194_304  # ZeRO-1 reduce-scatter / all-gather bucket size (elements)
    # DualPipe/DualPipeV: run F&B pairs interleaved at attention/dispatch/experts/combine
    # granularity with asynchronous all-to-alls (megads.parallel.overlap_stage).
    overlap_fb: bool = True
    # every process group (the default one, pipeline, data, expert, embedding, checkpoint): a
    # collective that does not complete within this many seconds ends the job with a message
    # naming the rank and the step (torch's own default is 30 minutes for the sub-groups)
    collective_timeout_s: float = 600.0

    def pieces_per_rank(self) -> int:
        """Model pieces one pipeline rank holds: 2 for DualPipeV's V and interleaved 1F1B, else 1.

        (DualPipe holds two chunks per rank too, but they are replicas of the same pp pieces.)
        Without pipelining (pp = 1) the schedule plays no part: one piece.
        """
        return pieces_per_rank(self.schedule) if self.pp > 1 else 1

    def plan(self, *, world_size: int, model: Any, ranks_per_node: int | None = None) -> Any:
        """`megads.parallel.mesh.plan_layout` for this config and a ModelConfig (numbers only)."""
        from megads.parallel.mesh import plan_layout

        return plan_layout(
            world_size=world_size, pp=self.pp, ep=self.ep, num_layers=model.num_hidden_layers,
            n_routed_experts=model.n_routed_experts, stage_layers=self.stage_layers,
            pieces_per_rank=self.pieces_per_rank(), ranks_per_node=self.ranks_per_node or ranks_per_node,
            n_group=model.n_group, topk_group=model.topk_group, node_limit=self.node_limit, cp=self.cp,
        )

    def data_parallel_size(self, *, world_size: int) -> int:
        """Replicas reading different sequences: world / (pp * cp)."""
        return world_size // (self.pp * self.cp)

    def validate(self, *, world_size: int, model: Any = None) -> None:
        """Raise ValueError naming the clashing numbers; with `model` (a ModelConfig) also the layout.

        Runs before any process group exists: the layout checks are `plan_layout`'s (world
        divisible by pp, ep dividing dp, experts divisible by ep, layers assignable to stages,
        node-limited routing consistent with the node layout).
        """
        errors: list[str] = []
        if self.pp < 1 or self.ep < 1 or self.cp < 1:
            errors.append(f"parallel.pp={self.pp}, parallel.ep={self.ep} and parallel.cp={self.cp} must be >= 1")
        elif world_size % self.pp:
            fits = [d for d in range(1, world_size + 1) if world_size % d == 0]
            errors.append(
                f"world size {world_size} is not divisible by parallel.pp={self.pp}; pick pp among {fits}"
            )
        elif world_size % (self.pp * self.cp):
            per_stage = world_size // self.pp
            fits = [d for d in range(1, per_stage + 1) if per_stage % d == 0]
            errors.append(
                f"parallel.cp={self.cp} does not divide the {per_stage} ranks of a stage (world {world_size} / "
                f"pp {self.pp}); pick cp among {fits}"
            )
        if self.micro_batch_size < 1:
            errors.append(f"parallel.micro_batch_size={self.micro_batch_size} must be >= 1")
        if self.schedule not in schedule_names():
            errors.append(f"parallel.schedule={self.schedule!r} must be one of {list(schedule_names())}")
        if self.backend not in _BACKENDS:
            errors.append(f"parallel.backend={self.backend!r} must be one of {list(_BACKENDS)}")
        if self.moments_dtype not in _MOMENT_DTYPES:
            errors.append(f"parallel.moments_dtype={self.moments_dtype!r} must be one of {list(_MOMENT_DTYPES)}")
        if self.node_limit < 1:
            errors.append(f"parallel.node_limit={self.node_limit} must be >= 1")
        if not self.collective_timeout_s > 0:
            errors.append(f"parallel.collective_timeout_s={self.collective_timeout_s} must be > 0 (seconds)")
        if self.bucket_numel < 1:
            errors.append(f"parallel.bucket_numel={self.bucket_numel} must be >= 1")
        if not errors and model is not None:
            try:
                self.plan(world_size=world_size, model=model)
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("invalid parallel config (conf/parallel/*.yaml or parallel.* overrides):\n  - "
                             + "\n  - ".join(errors))

    def resolve_backend(self, *, cuda: bool) -> str:
        if self.backend == "auto":
            return "nccl" if cuda else "gloo"
        return self.backend
