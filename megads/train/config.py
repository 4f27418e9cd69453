"""Structured configs of the trainer (Hydra groups model, data, optim, schedule, parallel, logging).

Every group is a dataclass registered in Hydra's ConfigStore, and the root schema
`train_schema` types the whole tree, so a misspelt key fails at composition. `data` is the one
untyped node: it is typed when the trainer resolves it (`megads.train.data_source`), because
its schema depends on the source (built-in token files or the byte-level fallback).

Quantities the DeepSeek-V3 report gives in tokens are configured in tokens (floats, so that
`1.48e13` reads naturally in YAML); the warmup is in optimizer steps, as in the report.

`validate_config` runs before any process group starts and collects every problem into one
`ConfigError` that names the field and says what to change.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megads.model.config import ModelConfig
from megads.parallel.config import ParallelConfig


class ConfigError(ValueError):
    """A user error in the training configuration (the message says what to change)."""


@dataclass
class OptimConfig:
    """AdamW (torch.optim.AdamW). Decay follows Megatron-LM: every 1-D parameter (RMSNorm
    weights, biases) is excluded from weight decay; matrices, the embedding and the output
    head are decayed (set `decay_embedding: false` to exclude the embedding table too)."""

    name: str = "adamw"
    lr: float = 2.2e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # end of the cosine decay = lr * min_lr_ratio (SPEC: 2.2e-5)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embedding: bool = True
    clip_grad: float = 1.0  # global gradient-norm clipping; 0 disables
    # (no `fused` switch: megads' ZeRO-1 optimizer always runs torch's fused AdamW kernel on its
    # flat fp32 shards, or its own chunked update with bf16 moments)


@dataclass
class LrStage:
    """A constant tail of the LR schedule: `lr` for `tokens` tokens."""

    tokens: float = 0.0
    lr: float = 0.0


@dataclass
class ScheduleConfig:
    """The token-based training recipe (defaults = DeepSeek-V3, SPEC.md)."""

    # learning rate: linear 0 -> optim.lr over warmup_steps, constant until constant_tokens
    # (absolute token position), cosine to optim.lr * min_lr_ratio over decay_tokens, then tails
    warmup_steps: int = 2000
    constant_tokens: float = 10e12
    decay_tokens: float = 4.3e12
    lr_tails: list[LrStage] = field(
        default_factory=lambda: [LrStage(tokens=333e9, lr=2.2e-5), LrStage(tokens=167e9, lr=7.3e-6)]
    )
    # global batch in sequences: batch_start -> batch_end linearly over batch_ramp_tokens, each
    # value rounded to the pipeline schedule's granularity (megads.train.schedule.batch_granularity:
    # a multiple of micro_batch_size x dp x the schedule's micro-batch step, at least its minimum)
    batch_start: int = 3072
    batch_end: int = 15360
    batch_ramp_tokens: float = 469e9
    # auxiliary-loss-free balancing speed gamma, 0 from bias_update_stop_tokens on
    bias_update_speed: float = 0.001
    bias_update_stop_tokens: float = 14.3e12
    # MTP loss weight lambda: mtp_weight, then mtp_weight_after from mtp_weight_switch_tokens on
    mtp_weight: float = 0.3
    mtp_weight_after: float = 0.1
    mtp_weight_switch_tokens: float = 10e12
    # run length: exactly one of train_tokens (> 0) and train_steps (> 0)
    train_tokens: float = 14.8e12
    train_steps: int = 0


@dataclass
class WandbConfig:
    # auto = online when WANDB_API_KEY is set, else offline. The WANDB_MODE environment
    # variable, when set, overrides this field.
    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "megads"
    entity: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 60.0


@dataclass
class LoggingConfig:
    console_every: int = 10  # steps between console lines (rank 0, global figures)
    wandb_every: int = 1  # steps between wandb records
    run_name: str | None = None  # None = "<model>-<schedule>" from the Hydra choices
    loss_png: bool = True  # loss curve PNG in the run folder at the end
    expert_load_png: bool = True  # expert-load imbalance PNG in the run folder at the end
    heatmap_every: int = 50  # steps between per-expert load heatmaps (PNG + wandb image); 0 = only at the end
    expert_heatmap_png: bool = True  # false: no per-expert load heatmap at all (no matplotlib during the run)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None = <run_dir>/checkpoints
    every_steps: int = 0  # 0 = only at the end
    keep_last: int = 2  # completed checkpoints kept (older ones deleted); 0 = keep all
    at_end: bool = True
    resume: str = "auto"  # auto = newest intact checkpoint in dir, if any | never | <path of a step_* dir>
    # Weights only (fresh optimizer, schedule and data) from a megads checkpoint folder of any
    # layout, a `megads-convert from-hf` folder, or a Hugging Face folder; a resume wins over it.
    init_from: str | None = None
    async_save: bool = False  # copy the state to CPU memory and write it from a background thread
    verify: str = "checksum"  # before a resume: checksum (sizes + SHA-256 of every file) | size
    # A resume refuses a checkpoint trained with other optim.* / schedule.* / precision values
    # (the run length excepted); true applies the new values from the resumed step on.
    allow_changed_settings: bool = False


@dataclass
class GuardsConfig:
    """What the trainer does about bad numbers (docs/training.md, "Non-finite steps")."""

    # a step whose global loss or gradient norm is not finite is skipped on every rank (no
    # parameter, moment or expert-bias update); at the Nth skipped step in a row the run stops
    # with a checkpoint of the last good state (1 = at the first)
    max_consecutive_skips: int = 10
    # a loss above loss_spike_factor x the median of the last loss_spike_window steps is logged
    loss_spike_factor: float = 3.0
    loss_spike_window: int = 50


@dataclass
class StageSpec:
    """One stage of a staged run (docs/training.md, "Staged runs")."""

    name: str = "???"
    # value overrides of the run's config for this stage, in Hydra's override syntax
    # (`seq_len=32768`, `model.rope_scaling={type:yarn,factor:40,...}`, `optim.lr=7.3e-6`,
    # `schedule.train_steps=1000`, `parallel.pp=8`); group choices (`model=small`) are not allowed
    overrides: list[str] = field(default_factory=list)
    # true: the stage starts from the previous stage's model *and* optimizer state (moments, step
    # count); false: from its weights only (a fresh optimizer). Schedule and data always start
    # afresh: the stage has its own.
    carry_optimizer: bool = True


@dataclass
class StagesConfig:
    """Hydra group `stages`: an empty list is a single-stage run (everything as without stages)."""

    list: list[StageSpec] = field(default_factory=list)
    # start the run at this stage (by name), e.g. one Slurm job per stage: earlier stages are not
    # run and this one starts from checkpoint.init_from (null: the first unfinished stage)
    start: str | None = None
    stop: str | None = None  # end the job after this stage (null: after the last)


@dataclass
class Fp8Config:
    """precision=fp8: DeepSeek-V3's block-scaled E4M3 GEMMs (megads.model.fp8, docs/fp8.md)."""

    backend: str = "auto"  # auto (first that runs of te, torch, emulated) | te | torch | emulated
    pow2_scales: bool = True  # scales rounded up to powers of two (Transformer Engine's default)
    # the rows entering the routed experts cross the EP all-to-all in FP8 with their scales
    # (D + 4 D/128 bytes a row); needs pow2_scales
    dispatch: bool = True


@dataclass
class MemoryConfig:
    """How a step trades compute for memory (no effect on the numbers: not in the run
    fingerprint, free to change on resume)."""

    # > 0: the LM and MTP cross entropies in chunks of this many tokens, each recomputed in the
    # backward, so at most [chunk, vocab] logits exist at once (megads.model.loss); 0 = whole
    loss_chunk_tokens: int = 0
    # activation recomputation: none | selective (attention and expert MLP insides) | full (every
    # block from its boundaries; megads.model.recompute)
    recompute: str = "none"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Any = field(default_factory=dict)  # typed by megads.train.data_source.resolve_data_config
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    stages: StagesConfig = field(default_factory=StagesConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    fp8: Fp8Config = field(default_factory=Fp8Config)
    seed: int = 1234
    # auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 (autocast, fp32 master weights) | fp8 (the
    # blocks' GEMMs in block-scaled FP8, see `fp8`; the rest as auto)
    precision: str = "auto"
    # torch.compile every transformer block (its norms, attention, SwiGLU, router and combine;
    # the GEMMs, routed experts and all-to-alls stay eager: megads.parallel.compile). The same
    # numbers as eager within float32 rounding; the first steps pay the compilation.
    compile: bool = False
    seq_len: int = 4096
    run_dir: str | None = None  # None = outputs/<logging.run_name>
    device: str = "auto"  # auto (cuda:<local rank> when available, else cpu) | cpu | cuda


def register_configs() -> None:
    """Register the root schema and each group's schema with Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="schedule", name="schedule_schema", node=ScheduleConfig)
    cs.store(group="parallel", name="parallel_schema", node=ParallelConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)
    cs.store(group="stages", name="stages_schema", node=StagesConfig)


def default_run_name(explicit: str | None, model: str | None, schedule: str | None) -> str:
    """logging.run_name when set, else "<model>-<schedule>" ("<model>" when both are one name)."""
    if explicit:
        return str(explicit)
    if not schedule or model == schedule:
        return str(model or "run")
    return f"{model}-{schedule}"


def register_resolvers() -> None:
    """OmegaConf resolvers used by conf/config.yaml (`${megads_run_name:...}` in hydra.run.dir)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("megads_run_name"):
        OmegaConf.register_new_resolver("megads_run_name", default_run_name)


def _unknown_keys(node: Any, schema: type, *, path: str) -> list[str]:
    """The keys of the mapping `node` (recursively) that the dataclass `schema` has no field for."""
    if not isinstance(node, dict):
        return []
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    errors = []
    for key, value in node.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = [f"{path}.{c}" if path else c for c in difflib.get_close_matches(str(key), names, n=1)]
            errors.append(
                f"unknown key {where}" + (f" (did you mean {close[0]}?)" if close else "")
                + f"; {path or 'the root'} ({schema.__name__}) has: {', '.join(names)}"
            )
            continue
        sub = _dataclass_in(hints[key])
        if sub is None:
            continue
        if isinstance(value, list):
            for i, item in enumerate(value):
                errors += _unknown_keys(item, sub, path=f"{where}[{i}]")
        else:
            errors += _unknown_keys(value, sub, path=where)
    return errors


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field holds: `X`, `X | None` or `list[X]` (not inside dicts; `Any` holds none)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) is dict:
        return None
    for arg in typing.get_args(hint):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def to_train_config(cfg: Any) -> TrainConfig:
    """A composed DictConfig (or plain dict) -> TrainConfig, rejecting unknown keys.

    The keys are checked against the dataclasses before merging: Hydra's `+key=value` and
    `++key=value` insert a key even into a structured node (OmegaConf.update(force_add=True)), and
    OmegaConf.merge / to_object then carry it along as an extra attribute instead of failing.
    `data` is typed later (`megads.train.data_source.resolve_data_config` rejects its unknown keys).
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    tree = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else cfg
    unknown = _unknown_keys(tree, TrainConfig, path="")
    if unknown:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(unknown))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid training config: {e}") from None
    assert isinstance(obj, TrainConfig)
    return obj


_PRECISIONS = ("auto", "fp32", "bf16", "fp8")
_DEVICES = ("auto", "cpu", "cuda")


def _fp8_errors(cfg: TrainConfig) -> list[str]:
    """fp8.* against what this machine can run (the device the run will get: device=cpu, or auto
    without a visible GPU, is a CPU)."""
    import torch

    from megads.model.fp8 import FP8_BACKENDS, Fp8BackendUnavailable, choose_fp8_backend

    if cfg.fp8.backend not in FP8_BACKENDS:
        return [f"fp8.backend={cfg.fp8.backend!r} must be one of {list(FP8_BACKENDS)}"]
    if cfg.fp8.dispatch and not cfg.fp8.pow2_scales:
        return ["fp8.dispatch=true needs fp8.pow2_scales=true (re-quantising the dispatched rows is exact "
                "only with power-of-two scales); set one of them to the other's value"]
    gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    try:
        choose_fp8_backend(cfg.fp8.backend, torch.device("cuda" if gpu else "cpu"))
    except Fp8BackendUnavailable as e:
        return [str(e)]
    return []


def _compile_errors(cfg: TrainConfig) -> list[str]:
    """compile=true against this machine: inductor generates C++ on a CPU (it needs a compiler)
    and Triton kernels on a GPU."""
    import shutil

    import torch

    gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if gpu:
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:
            return ["compile=true on a GPU needs Triton (pip install triton, the version of this torch build), "
                    "or set compile=false"]
        return []
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return ["compile=true on a CPU needs a C++ compiler on the PATH (inductor builds its kernels with it): "
                "install g++ or set compile=false"]
    return []


def validate_config(cfg: TrainConfig, *, world_size: int) -> None:
    """Check every group and their relations before any process group starts."""
    from megads.pipeline.schedules import validate_microbatches
    from megads.train.schedule import batch_granularity, plan_run, ramp_bounds

    errors: list[str] = []
    from megads.train.data_source import resolve_data_config

    for check in (
        lambda: cfg.model.validate(),
        lambda: cfg.parallel.validate(world_size=world_size, model=cfg.model),
        lambda: resolve_data_config(cfg.data),
    ):
        try:
            check()
        except ValueError as e:
            errors.append(str(e))
    o, s = cfg.optim, cfg.schedule
    g = cfg.guards
    if g.max_consecutive_skips < 1 or g.loss_spike_window < 1 or not g.loss_spike_factor > 1:
        errors.append(f"guards.max_consecutive_skips={g.max_consecutive_skips} must be >= 1, "
                      f"guards.loss_spike_window={g.loss_spike_window} >= 1 and "
                      f"guards.loss_spike_factor={g.loss_spike_factor} > 1")
    if cfg.memory.recompute not in ("none", "selective", "full"):
        errors.append(f"memory.recompute={cfg.memory.recompute!r} must be none, selective or full")
    if cfg.memory.loss_chunk_tokens < 0:
        errors.append(f"memory.loss_chunk_tokens={cfg.memory.loss_chunk_tokens} must be >= 0 (0 = the whole sequence)")
    if o.name != "adamw":
        errors.append(f"optim.name={o.name!r}: only 'adamw' is implemented")
    if not o.lr > 0:
        errors.append(f"optim.lr={o.lr} must be > 0")
    if not 0 <= o.min_lr_ratio <= 1:
        errors.append(f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        errors.append(f"optim.betas={list(o.betas)} must be two numbers in [0, 1)")
    if o.eps <= 0 or o.weight_decay < 0 or o.clip_grad < 0:
        errors.append(
            f"optim.eps={o.eps} must be > 0, optim.weight_decay={o.weight_decay} and "
            f"optim.clip_grad={o.clip_grad} >= 0"
        )
    if cfg.precision not in _PRECISIONS:
        errors.append(f"precision={cfg.precision!r} must be one of {list(_PRECISIONS)}")
    if cfg.precision == "fp8":
        errors.extend(_fp8_errors(cfg))
    if cfg.device not in _DEVICES:
        errors.append(f"device={cfg.device!r} must be one of {list(_DEVICES)}")
    if cfg.compile and cfg.parallel.cp > 1:
        errors.append(
            f"compile=true with parallel.cp={cfg.parallel.cp}: the attention's latent all-gather (a collective "
            "inside an autograd function) is not compiled yet; set compile=false for this run or stage "
            "(docs/parallel.md, \"Context parallel\")"
        )
    if cfg.compile:
        errors.extend(_compile_errors(cfg))
    if cfg.seq_len < 2:
        errors.append(f"seq_len={cfg.seq_len} must be >= 2")
    elif cfg.model.rope_scaling is None and cfg.seq_len > cfg.model.max_position_embeddings:
        errors.append(
            f"seq_len={cfg.seq_len} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}; "
            "lower seq_len or raise max_position_embeddings (or configure model.rope_scaling)"
        )
    if cfg.parallel.cp > 1 and cfg.seq_len % (2 * cfg.parallel.cp):
        cp = cfg.parallel.cp
        errors.append(
            f"seq_len={cfg.seq_len} with parallel.cp={cp}: context parallel cuts a sequence into 2*cp = {2 * cp} "
            f"equal chunks (two per rank, load-balanced for causal attention); use a seq_len that is a multiple of "
            f"{2 * cp} (e.g. {(cfg.seq_len // (2 * cp) + 1) * 2 * cp})"
        )
    if s.warmup_steps < 0:
        errors.append(f"schedule.warmup_steps={s.warmup_steps} must be >= 0")
    if s.constant_tokens < 0 or s.decay_tokens < 0 or s.batch_ramp_tokens < 0:
        errors.append("schedule.constant_tokens, decay_tokens and batch_ramp_tokens must be >= 0")
    for i, stage in enumerate(s.lr_tails):
        if stage.tokens <= 0 or stage.lr < 0:
            errors.append(f"schedule.lr_tails[{i}]={stage} needs tokens > 0 and lr >= 0")
    if (s.train_tokens > 0) == (s.train_steps > 0):
        errors.append(
            f"schedule.train_tokens={s.train_tokens} and schedule.train_steps={s.train_steps}: set exactly "
            "one of them > 0 (e.g. schedule.train_tokens=0 schedule.train_steps=300)"
        )
    if s.bias_update_speed < 0 or s.mtp_weight < 0 or s.mtp_weight_after < 0:
        errors.append("schedule.bias_update_speed, mtp_weight and mtp_weight_after must be >= 0")
    lg, ck = cfg.logging, cfg.checkpoint
    if lg.heatmap_every < 0:
        errors.append(f"logging.heatmap_every={lg.heatmap_every} must be >= 0 (0 = one heatmap at the end)")
    if lg.console_every < 1 or lg.wandb_every < 1:
        errors.append(f"logging.console_every={lg.console_every} and wandb_every={lg.wandb_every} must be >= 1")
    if lg.wandb.mode not in ("auto", "online", "offline", "disabled"):
        errors.append(f"logging.wandb.mode={lg.wandb.mode!r} must be auto, online, offline or disabled")
    if ck.every_steps < 0 or ck.keep_last < 0:
        errors.append(f"checkpoint.every_steps={ck.every_steps} and keep_last={ck.keep_last} must be >= 0")
    if ck.verify not in ("checksum", "size"):
        errors.append(f"checkpoint.verify={ck.verify!r} must be checksum or size")
    if ck.init_from is not None and not Path(ck.init_from).is_dir():
        errors.append(f"checkpoint.init_from={ck.init_from!r} is not a folder (a megads checkpoint step folder, a "
                      "megads-convert from-hf folder or a Hugging Face checkpoint folder)")
    if not errors:
        # the batch ramp against the layout: every global batch it reaches must be micro_batch_size x dp x M
        # with M a micro-batch count the pipeline schedule accepts (`batch_granularity`); the ramp is rounded
        # to that (the trainer logs `ramp_note`), so only a batch_end below every valid value is an error
        p = cfg.parallel
        dp = p.data_parallel_size(world_size=world_size)
        if s.batch_start < 1:
            errors.append(f"schedule.batch_start={s.batch_start} sequences must be >= 1")
        elif s.batch_end < s.batch_start:
            errors.append(f"schedule.batch_end={s.batch_end} must be >= schedule.batch_start={s.batch_start}")
        else:
            try:
                gran = batch_granularity(schedule=p.schedule, pp=p.pp, micro_batch_size=p.micro_batch_size, dp=dp)
                ramp_bounds(s, gran=gran)
            except ValueError as e:
                errors.append((f"parallel.schedule={p.schedule} with pp={p.pp}: " if p.pp > 1 else "") + str(e))
    if not errors:
        plan = plan_run(s, seq_len=cfg.seq_len, gran=gran)
        for batch in plan.batches:  # the distinct global batches of the whole run, not just the first
            try:
                if batch % gran.per_microbatch:
                    raise ValueError(f"not a multiple of micro_batch_size x dp = {gran.per_microbatch}")
                if p.pp > 1:  # without pipelining any micro-batch count runs
                    validate_microbatches(p.schedule, pp=p.pp, num_microbatches=batch // gran.per_microbatch)
            except ValueError as e:
                errors.append(f"the batch ramp reaches {batch} sequences, which the layout cannot run: {e}")
                break
        if plan.warmup_end_tokens > s.constant_tokens and s.warmup_steps > 0:
            errors.append(
                f"the {s.warmup_steps} warmup steps end at {plan.warmup_end_tokens:.4g} tokens, after "
                f"schedule.constant_tokens={s.constant_tokens:.4g}; raise constant_tokens or lower warmup_steps"
            )
    if errors:
        raise ConfigError("invalid training config:\n  - " + "\n  - ".join(errors))
