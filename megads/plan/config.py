"""Structured configs of the capacity planner (Hydra root `plan_schema`, group `cluster`).

`megads-plan` composes conf/plan.yaml: the trainer's `model` and `parallel` groups (the same
presets, so a planned layout is a trainer layout), the `cluster` group (conf/cluster/*.yaml, every
number with its public source), the planner's `efficiency` assumptions and its `search` space.
`validate()` of each dataclass raises ValueError naming the field and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megads.model.config import ModelConfig
from megads.parallel.config import ParallelConfig
from megads.pipeline.schedules import schedule_names

PRECISIONS = ("fp32", "bf16", "fp8")
RECOMPUTE = ("none", "selective", "full")
MODES = ("estimate", "search")


@dataclass
class ClusterConfig:
    """One cluster: its nodes and the per-GPU figures the time and memory models read."""

    name: str = "h800_2048"
    gpu: str = "H800 SXM5"
    nodes: int = 256
    gpus_per_node: int = 8
    sm_count: int = 132
    peak_tflops_bf16: float = 989.5  # dense (no sparsity)
    peak_tflops_fp8: float = 1979.0  # dense
    hbm_gb: float = 80.0  # decimal GB as marketed
    hbm_tbps: float = 3.35
    nvlink_gbps: float = 160.0  # per GPU, one direction, what a collective can reach
    internode_gbps: float = 50.0  # per GPU, one direction (one 400 Gb/s NIC per GPU)
    collective_latency_us: float = 30.0  # fixed cost of one all-to-all / ring collective

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        errors = [f"cluster.{n}={getattr(self, n)} must be > 0" for n in (
            "nodes", "gpus_per_node", "sm_count", "peak_tflops_bf16", "peak_tflops_fp8", "hbm_gb", "hbm_tbps",
            "nvlink_gbps", "internode_gbps") if not getattr(self, n) > 0]
        if self.collective_latency_us < 0:
            errors.append(f"cluster.collective_latency_us={self.collective_latency_us} must be >= 0")
        if errors:
            raise ValueError("invalid cluster config (conf/cluster/*.yaml or cluster.* overrides):\n  - "
                             + "\n  - ".join(errors))


@dataclass
class EfficiencyConfig:
    """Achieved fractions of the peaks, per kind of work (docs/planner.md: values and sources).

    One set for every cluster and model: the planner's predictions are checked against two
    published points with these numbers unchanged.
    """

    gemm_fp8: float = 0.60  # dense linears in FP8 with 1x128 / 128x128 scales, of the FP8 peak
    gemm_bf16: float = 0.70  # dense linears in BF16 (and the embedding-side head), of the BF16 peak
    grouped_fp8: float = 0.55  # routed-expert grouped GEMMs in FP8, of the FP8 peak
    grouped_bf16: float = 0.65  # routed-expert grouped GEMMs in BF16, of the BF16 peak
    attention: float = 0.45  # attention core (flash attention, BF16) forward+backward, of the BF16 peak
    hbm: float = 0.70  # memory-bound kernels (norms, SwiGLU, rope, permutes, casts), of HBM bandwidth
    elementwise_passes: float = 2.0  # HBM passes per saved activation byte in the forward (written once, read once); backward 2x
    nvlink: float = 0.95  # all-to-all over NVLink, of cluster.nvlink_gbps
    internode: float = 0.90  # all-to-all and data-parallel collectives over the network
    comm_sms: int = 20  # SMs held by the overlapped communication kernels (compute runs on the rest)
    dp_overlap: float = 0.0  # fraction of ZeRO-1 reduce-scatter / all-gather hidden behind compute

    def validate(self) -> None:
        errors = []
        for n in ("gemm_fp8", "gemm_bf16", "grouped_fp8", "grouped_bf16", "attention", "hbm", "nvlink", "internode"):
            v = getattr(self, n)
            if not 0 < v <= 1:
                errors.append(f"efficiency.{n}={v} must lie in (0, 1] (a fraction of the peak)")
        if not 0 <= self.dp_overlap <= 1:
            errors.append(f"efficiency.dp_overlap={self.dp_overlap} must lie in [0, 1]")
        if self.elementwise_passes < 0 or self.comm_sms < 0:
            errors.append("efficiency.elementwise_passes and efficiency.comm_sms must be >= 0")
        if errors:
            raise ValueError("invalid efficiency config (efficiency.* overrides):\n  - " + "\n  - ".join(errors))


@dataclass
class SearchConfig:
    """The layouts `mode=search` enumerates (null: every valid value)."""

    pp: list[int] | None = None
    ep: list[int] | None = None
    cp: list[int] = field(default_factory=lambda: [1])  # parallel.cp values (context parallel)
    schedules: list[str] = field(default_factory=lambda: ["1f1b", "zb1p", "dualpipe", "dualpipev"])
    micro_batch_sizes: list[int] = field(default_factory=lambda: [1, 2])
    recompute: list[str] = field(default_factory=lambda: ["none", "selective", "full"])
    balance_stages: bool = True  # choose parallel.stage_layers to balance the pipeline ranks' work
    max_pp: int = 32
    top: int = 5

    def validate(self) -> None:
        errors = []
        bad = [s for s in self.schedules if s not in schedule_names()]
        if bad:
            errors.append(f"search.schedules has {bad}; choose among {list(schedule_names())}")
        bad = [r for r in self.recompute if r not in RECOMPUTE]
        if bad:
            errors.append(f"search.recompute has {bad}; choose among {list(RECOMPUTE)}")
        if any(m < 1 for m in self.micro_batch_sizes) or any(c < 1 for c in self.cp) or self.top < 1:
            errors.append("search.micro_batch_sizes, search.cp and search.top must be >= 1")
        if errors:
            raise ValueError("invalid search config (search.* overrides):\n  - " + "\n  - ".join(errors))


@dataclass
class PlanConfig:
    """The root of conf/plan.yaml."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    efficiency: EfficiencyConfig = field(default_factory=EfficiencyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    mode: str = "estimate"  # estimate: the given layout | search: rank every layout of search.*
    seq_len: int = 4096
    precision: str = "bf16"  # fp32 | bf16 | fp8 (modelled analytically; emitted as the trainer's precision=fp8)
    global_batch: int = 15360  # sequences per optimizer step
    recompute: str = "none"  # memory.recompute of the trainer
    loss_chunk_tokens: int = 0  # memory.loss_chunk_tokens of the trainer
    # parallel.stage_layers null: choose the layer counts that balance the pipeline ranks' work
    # (else the trainer's default split, which ignores the head and MTP on the last piece)
    balance_stages: bool = True
    memory_margin: float = 0.10  # fraction of HBM kept free (allocator fragmentation, NCCL, CUDA context)
    tokens: float = 1e12  # cost figures are per this many tokens (GPU-hours per trillion by default)
    out_dir: str = "outputs/plan"
    plots: bool = True

    def validate(self) -> None:
        self.model.validate()
        self.cluster.validate()
        self.efficiency.validate()
        self.search.validate()
        errors = []
        if self.mode not in MODES:
            errors.append(f"mode={self.mode!r} must be one of {list(MODES)}")
        if self.precision not in PRECISIONS:
            errors.append(f"precision={self.precision!r} must be one of {list(PRECISIONS)}")
        if self.recompute not in RECOMPUTE:
            errors.append(f"recompute={self.recompute!r} must be one of {list(RECOMPUTE)}")
        for n in ("seq_len", "global_batch"):
            if getattr(self, n) < 1:
                errors.append(f"{n}={getattr(self, n)} must be >= 1")
        if not 0 <= self.memory_margin < 1:
            errors.append(f"memory_margin={self.memory_margin} must lie in [0, 1)")
        cp = self.parallel.cp
        if cp > 1 and self.seq_len % (2 * cp):
            errors.append(f"seq_len={self.seq_len} with parallel.cp={cp}: context parallel cuts a sequence into "
                          f"2*cp = {2 * cp} chunks; make seq_len a multiple of {2 * cp}")
        if errors:
            raise ValueError("invalid plan config (conf/plan.yaml or overrides):\n  - " + "\n  - ".join(errors))


def register_plan_configs() -> None:
    """Register the planner's schemas with Hydra (model and parallel under the names the trainer
    uses, so the same presets compose under both roots)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(name="plan_schema", node=PlanConfig)
    cs.store(group="cluster", name="cluster_schema", node=ClusterConfig)
