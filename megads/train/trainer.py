"""The training loop: validate, set up, run steps by the token schedule, checkpoint, report.

Order of events on every rank (torchrun / srun env, or a single process):

    1. validate the whole config (model, data, parallel, schedule) -- no process group yet;
       rank 0 takes the run-folder lock, checks the folder is writable, finds the checkpoint to
       resume from and checks it against this launch (megads.train.preflight)
    2. init the process group (gloo on CPU, nccl on GPU; a one-rank group for one process)
    3. seed; the one step executor (megads.parallel.executor.ParallelExecutor) builds this
       rank's share of the model under the seed (the whole model when pp = ep = 1), its ZeRO-1
       AdamW and the pipeline schedule; this rank's data loader (sharded by data-parallel rank)
    4. resume from the checkpoint found in 1
    5. per step: global batch from the ramp -> this rank's micro-batches; lr, MTP weight and
       bias-update speed from the token schedule; executor.run (schedule, ZeRO-1, clip, AdamW,
       bias update); rank 0 logs global figures to the console, metrics.jsonl, wandb
    6. checkpoint every checkpoint.every_steps and at the end; PNGs; print where results are

A staged run (`stages=...`, megads.train.stages) validates every stage's config in 1 and runs
3-6 once per stage, in the same process group, each stage in its own run folder and starting
from the previous stage's final checkpoint. A step whose global loss or gradient norm is not
finite is skipped on every rank (`guards.*`); a collective that times out ends the rank with a
`CollectiveFailure` naming it and the step (`parallel.collective_timeout_s`).

Plain data parallel and a single process are the pp = 1 case of the same executor, as
Megatron-Core treats "no pipelining" as one more schedule: there is one code path per step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megads.checkpoint.state import (
    load_model_and_optimizer,
    load_model_weights,
    load_training_state,
    set_rng_state,
    training_entries,
)
from megads.checkpoint.writer import CheckpointWriteFailed, CheckpointWriter
from megads.model import count_parameters
from megads.model.linear import LinearFactory
from megads.parallel.executor import OptimSettings, ParallelExecutor, StepMetrics, global_router_names
from megads.parallel.mesh import DistEnv, ParallelMesh, init_distributed, read_dist_env
from megads.pipeline.schedules import get_schedule
from megads.plan.estimate import model_flops_per_token
from megads.train.config import ConfigError, TrainConfig, validate_config
from megads.train.data_source import build_loader, resolve_data_config
from megads.train.monitor import WandbLogger, plot_expert_heatmap, plot_expert_load, plot_loss
from megads.train.optim import param_groups_for
from megads.train.perf import device_peak_flops, memory_figures
from megads.train.preemption import Preempted, PreemptionWatch, touch_marker
from megads.train.preflight import (
    check_resume,
    check_writable,
    checkpoint_meta,
    find_resume,
    resolve_run_dir,
    run_fingerprint,
)
from megads.train.run_lock import RunFolderLock, exit_when_launcher_dies
from megads.train.schedule import (
    batch_granularity,
    bias_update_speed_at,
    global_batch_at,
    lr_at,
    mtp_weight_at,
    plan_run,
    ramp_note,
)
from megads.train.stages import Stage, mark_stage_done, plan_stages, stage_done

log = logging.getLogger("megads.train")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: float
    checkpoint: Path | None = None
    loss_png: Path | None = None
    expert_load_png: Path | None = None
    wandb_dir: str | None = None
    history: list[dict[str, float]] = field(default_factory=list)


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.4g}{unit}"
    return f"{n:.4g}"


def _fmt_time(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32). fp8: the GEMMs of the blocks are FP8 (the linear
    factory); everything else runs as under auto (bf16 autocast on CUDA, float32 on CPU)."""
    precision = cfg.precision
    if precision in ("auto", "fp8"):
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def linear_factory_for(cfg: TrainConfig, *, device: torch.device, rank: int = 0) -> LinearFactory | None:
    """The GEMM backend of the run: None (native PyTorch) unless precision=fp8, whose backend
    is chosen here (fp8.backend) and named in the log by rank 0, with the reason."""
    if cfg.precision != "fp8":
        return None
    from megads.model.fp8 import Fp8BackendUnavailable, choose_fp8_backend  # noqa: PLC0415

    try:
        factory, line = choose_fp8_backend(cfg.fp8.backend, device, pow2_scales=cfg.fp8.pow2_scales,
                                           dispatch=cfg.fp8.dispatch)
    except Fp8BackendUnavailable as e:
        raise ConfigError(str(e)) from None
    if rank == 0:
        log.info(line)
    return factory


def build_executor(
    cfg: TrainConfig, *, env: DistEnv, device: torch.device, autocast_dtype: torch.dtype | None,
    mesh: ParallelMesh | None = None, init: bool = True,
) -> ParallelExecutor:
    """Plan the layout (numbers only), build the mesh and this rank's executor.

    The executor builds its share of the model under `cfg.seed` (the same initial weights as
    the single-process `DeepseekV3(cfg.model)` after `torch.manual_seed(cfg.seed)`) and its
    ZeRO-1 AdamW over the weight-decay groups of `param_groups_for`. `mesh` replaces the one
    built from the process groups (`tools/rank_memory` passes one rank's mesh without any);
    `init=False` leaves the parameters uninitialised (a checkpoint load or a measurement follows).
    """
    p, o = cfg.parallel, cfg.optim
    try:
        plan = p.plan(world_size=env.world_size, model=cfg.model, ranks_per_node=env.local_world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    mesh = mesh or ParallelMesh.build(plan, timeout_s=p.collective_timeout_s)
    optim = OptimSettings(
        lr=o.lr, betas=(float(o.betas[0]), float(o.betas[1])), eps=o.eps, weight_decay=o.weight_decay,
        max_grad_norm=o.clip_grad, bucket_numel=p.bucket_numel,
    )
    # the overlapped stage pays off where the schedule has F&B pairs
    overlap_fb = p.overlap_fb and p.pp > 1 and get_schedule(p.schedule).has_fb_pairs
    return ParallelExecutor(
        cfg.model, mesh=mesh, plan=plan, schedule=p.schedule if p.pp > 1 else "1f1b",
        micro_batch_size=p.micro_batch_size, seed=cfg.seed, optim=optim, zero1=p.zero1,
        moments_dtype=torch.bfloat16 if p.moments_dtype == "bfloat16" else torch.float32,
        device=device, autocast_dtype=autocast_dtype, overlap_fb=overlap_fb,
        param_groups_fn=lambda model: param_groups_for(model.named_parameters(), o), init=init,
        loss_chunk_tokens=cfg.memory.loss_chunk_tokens, recompute=cfg.memory.recompute, compile=cfg.compile,
        linear_factory=linear_factory_for(cfg, device=device, rank=env.rank),
    )


def init_weights_from(source: str, executor: ParallelExecutor) -> str:
    """`checkpoint.init_from`: this rank's weights from a megads checkpoint folder (any layout) or
    an HF folder (only this rank's tensors are read); returns which kind it was."""
    path = Path(source)
    if (path / "meta.json").is_file():
        load_model_weights(path, executor)
        return "megads checkpoint"
    from megads.convert.hf import load_hf_weights_into  # noqa: PLC0415  (only this path reads HF folders)

    mesh, cfg = executor.mesh, executor.cfg
    load_hf_weights_into(executor.model, path, expert_start=mesh.ep_rank * (cfg.n_routed_experts // mesh.ep))
    executor.optimizer.reset_from_params()
    return "Hugging Face checkpoint"


def _save_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The per-step records of <run_dir>/metrics.jsonl ([] when absent)."""
    if not path.is_file():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # a run killed mid-write leaves a torn record: drop it (the resumed run rewrites the log)
            log.warning(f"warning: {path}: line {i + 1} is not a JSON record (a torn write?); dropped")
    return records


class CollectiveFailure(RuntimeError):
    """A collective timed out or lost a peer: the job ends instead of hanging (parallel.collective_timeout_s)."""


def _collective_failure(e: BaseException, *, rank: int, step: int, timeout_s: float) -> BaseException:
    """`e` as a CollectiveFailure naming the rank and the step when it comes from a collective
    that timed out or whose peer went away; other errors are returned unchanged."""
    text = str(e)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    low = text.lower()
    if "timed out" in low or "timeout" in low:
        return CollectiveFailure(
            f"rank {rank}, step {step}: a collective did not complete within parallel.collective_timeout_s="
            f"{timeout_s:g} s ({first}); another rank is stuck or gone: look for the rank that stopped first"
        )
    if any(k in low for k in ("connection closed", "connection reset", "broken pipe", "peer")):
        return CollectiveFailure(f"rank {rank}, step {step}: a peer of a collective went away ({first}); "
                                 "another rank died: its own log says why")
    return e


class NonFiniteTraining(RuntimeError):
    """`guards.max_consecutive_skips` non-finite steps in a row: the run stopped (with a checkpoint)."""


@dataclass
class SkipGuard:
    """Counts skipped (non-finite) steps and watches the loss for spikes."""

    spike_factor: float
    window: int
    total: int = 0
    consecutive: int = 0
    recent: list[float] = field(default_factory=list)

    def record_skip(self, step: int, m: StepMetrics, *, say: Any) -> None:
        self.total += 1
        self.consecutive += 1
        what = "loss" if not math.isfinite(m.loss) else "gradient norm"
        say(f"step {step}: non-finite {what} (loss {m.loss}, gradient norm {m.grad_norm}): the update is skipped "
            f"on every rank ({self.consecutive} in a row, {self.total} in all)")

    def record_loss(self, loss: float) -> float | None:
        """The running median when `loss` is a spike above it (None otherwise); then remembers it."""
        self.consecutive = 0
        median = statistics.median(self.recent) if len(self.recent) >= min(10, self.window) else None
        self.recent = (self.recent + [loss])[-self.window:]
        return median if median is not None and loss > self.spike_factor * median else None


@dataclass
class PerfRef:
    """What the per-step throughput figures are measured against (rank 0, once per run)."""

    flops_per_token: float  # model training FLOPs per token (megads.plan.estimate)
    peak_flops: float  # one rank's device peak (megads.train.perf)
    ranks: int
    node_limit: int  # M: the most nodes a token may reach under the layout
    stage_index: int = 0  # of a staged run (0 otherwise)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


def _history_entry(step: int, tokens: float, m: StepMetrics, *, lr: float, mtp_weight: float, gamma: float,
                   batch: int, step_s: float, perf: PerfRef | None = None) -> dict[str, float]:
    tps = m.tokens / max(step_s, 1e-9)
    h: dict[str, float] = {
        "step": step, "tokens": tokens, "loss/total": m.loss, "loss/lm": m.lm, "loss/mtp": m.mtp,
        "loss/balance": m.balance, "lr": lr, "grad_norm": m.grad_norm, "tokens_per_s": tps,
        "batch_sequences": batch, "mtp_weight": mtp_weight, "bias_update_speed": gamma, "step_time_s": step_s,
        "skipped": int(m.skipped),
    }
    if perf is not None:
        achieved = perf.flops_per_token * tps / perf.ranks  # per rank
        h["perf/mfu"] = achieved / perf.peak_flops
        h["perf/tflops_per_rank"] = achieved / 1e12
        h["stage"] = perf.stage_index
        h.update(memory_figures(perf.device))
    x = m.extras
    if "bubble_fraction" in x:
        h["pipeline/bubble_fraction"] = x["bubble_fraction"]
    if x.get("a2a_bytes"):
        h["a2a/bytes"] = x["a2a_bytes"]
        h["a2a/wait_s"] = x["a2a_wait_s"]
    if x.get("cp_bytes"):
        h["cp/latent_bytes_per_rank"] = x["cp_bytes"]  # context parallel: rank 0's latent exchange bytes
    if x.get("nodes_per_token_mean"):
        h["routing/nodes_per_token_mean"] = x["nodes_per_token_mean"]
        h["routing/nodes_per_token_max"] = x["max_nodes_per_token"]
        if perf is not None:
            h["routing/node_limit"] = perf.node_limit
    if m.expert_load:
        imb = {name: s.imbalance for name, s in m.expert_load.items()}
        for name, v in imb.items():
            h[f"load/imbalance/{name.removesuffix('.mlp.gate')}"] = v
        h["load/imbalance_mean"] = sum(imb.values()) / len(imb)
        h["load/imbalance_max"] = max(imb.values())
    return h


def train(
    cfg: TrainConfig, *, run_name: str | None = None, resolved_yaml: str | None = None,
    job_dir: str | Path | None = None, wandb_group: str | None = None,
) -> TrainResult:
    """Run (or resume) the training job `cfg` on this rank; collective under torchrun / srun.

    `job_dir` is the Hydra job's output folder (hydra.run.dir, or the sweep job's folder under
    hydra.sweep.dir); an explicit `run_dir` wins over it. `wandb_group` groups the wandb runs of
    a sweep (the CLI passes the sweep's name; `logging.wandb.group` wins). With a stage list (`stages=...`) the
    stages run one after the other in this process group (megads.train.stages); the result is
    the last stage's.
    """
    exit_when_launcher_dies()  # a torchrun worker ends when torchrun dies (no-op for srun / one process)
    env = read_dist_env()
    validate_config(cfg, world_size=env.world_size)
    run_name = cfg.logging.run_name or run_name or "run"
    run_dir = resolve_run_dir(cfg, job_dir=job_dir, run_name=run_name)
    stages = plan_stages(cfg, run_dir=run_dir)
    for st in stages:  # every stage's config is checked before any process group starts
        try:
            validate_config(st.cfg, world_size=env.world_size)
            resolve_data_config(st.cfg.data, check_paths=True)
        except ConfigError as e:
            raise ConfigError(f"stage {st.name!r} (stages.list[{st.index}]): {e}") from None
    data_cfg = resolve_data_config(cfg.data, check_paths=True)
    device = resolve_device(cfg, env)
    pre: _Preflight | None = None
    lock = RunFolderLock(run_dir, rank=env.rank)  # taken by rank 0 only: one launch per run folder
    try:
        if env.rank == 0:
            # Everything that can refuse the launch, before a process group or a model exists. Only
            # rank 0 looks (the others wait in the rendezvous and take its answer); a refused launch
            # writes nothing into the folder.
            check_writable(run_dir, what="the run folder")
            lock.acquire()
            if not stages:
                pre = _preflight(cfg, run_dir=run_dir, data_cfg=data_cfg, world_size=env.world_size)

        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_distributed(backend=cfg.parallel.resolve_backend(cuda=device.type == "cuda"), env=env,
                         timeout_s=cfg.parallel.collective_timeout_s)
        try:
            if stages:
                return _train_stages(stages, env=env, device=device, run_name=run_name, run_dir=run_dir,
                                     wandb_group=wandb_group)
            shared = [run_dir, pre]  # rank 0's answers for every rank (its clock and file system view decide)
            dist.broadcast_object_list(shared, src=0)
            run_dir, pre = shared
            assert pre is not None
            return _train(cfg, env=env, device=device, data_cfg=data_cfg, run_name=run_name, run_dir=run_dir,
                          pre=pre, resolved_yaml=resolved_yaml, wandb_group=wandb_group)
        except Preempted as e:
            if env.rank == 0:
                touch_marker(e)
            # Every rank leaves together, after rank 0 closed its logs: a launcher that ends the job when
            # its first task exits (srun --kill-on-bad-exit) must not cut rank 0's wandb flush short.
            dist.barrier()
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    finally:
        lock.release()


@dataclass
class _Preflight:
    """What rank 0 found for one run folder before training it (shared with every rank)."""

    ckpt_dir: Path
    fingerprint: str
    resume_from: Path | None = None
    changed_settings: list[str] = field(default_factory=list)


def _preflight(cfg: TrainConfig, *, run_dir: Path, data_cfg: Any, world_size: int) -> _Preflight:
    """Rank 0: the checkpoint folder, the checkpoint to resume from and its checks (ConfigError)."""
    ckpt_dir = Path(cfg.checkpoint.dir).absolute() if cfg.checkpoint.dir else run_dir / "checkpoints"
    pre = _Preflight(ckpt_dir=ckpt_dir, fingerprint=run_fingerprint(cfg, data_cfg))
    pre.resume_from = find_resume(cfg, ckpt_dir=ckpt_dir)
    if pre.resume_from is not None:
        pre.changed_settings = check_resume(cfg, resume_from=pre.resume_from, world_size=world_size,
                                            fingerprint=pre.fingerprint)
    check_writable(ckpt_dir, what="the checkpoint folder")
    return pre


def _on_rank0(fn: Any) -> Any:
    """fn() on rank 0, its result (or its ConfigError, raised on every rank) on all ranks."""
    box: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except ConfigError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]


def _train_stages(
    stages: list[Stage], *, env: DistEnv, device: torch.device, run_name: str, run_dir: Path,
    wandb_group: str | None = None,
) -> TrainResult:
    """Each stage of `stages` in order: skip the finished ones, resume the first unfinished one
    from its own checkpoint or start it from the previous stage's final one (megads.train.stages)."""
    say = log.info if env.rank == 0 else (lambda *a, **k: None)
    prev: Path | None = None
    result: TrainResult | None = None
    say(f"staged run {run_name!r}: " + " -> ".join(f"{s.name} (seq_len {s.cfg.seq_len})" for s in stages))
    for i, st in enumerate(stages):
        done = _on_rank0(lambda st=st: stage_done(st.run_dir))
        if done is not None:
            prev = Path(done["checkpoint"])
            say(f"stage {st.name}: complete ({done['steps']} steps), skipped; its final checkpoint {prev}")
            continue
        data_cfg = resolve_data_config(st.cfg.data, check_paths=True)
        pre = _on_rank0(lambda st=st, data_cfg=data_cfg: _preflight(
            st.cfg, run_dir=st.run_dir, data_cfg=data_cfg, world_size=env.world_size))
        start: tuple[Path, bool] | None = None
        scfg = st.cfg
        if pre.resume_from is None:
            if prev is not None:
                start = (prev, st.spec.carry_optimizer)
            elif i == 0 and st.index > 0 and scfg.checkpoint.init_from:  # stages.start: a job of its own
                start = (Path(scfg.checkpoint.init_from), st.spec.carry_optimizer)
            if start is not None:
                scfg = dataclasses.replace(scfg, checkpoint=dataclasses.replace(scfg.checkpoint, init_from=None))
        say(f"stage {st.name} ({st.index + 1}/{st.total}): "
            + (f"resuming from {pre.resume_from}" if pre.resume_from is not None else
               f"starting from {start[0]} ({'model and optimizer' if start[1] else 'weights only'})" if start else
               "starting afresh"))
        result = _train(scfg, env=env, device=device, data_cfg=data_cfg, run_name=f"{run_name}-{st.name}",
                        run_dir=st.run_dir, pre=pre, resolved_yaml=None, start_from=start, stage=st.name,
                        stage_index=st.index, wandb_group=wandb_group or run_name)  # one group per staged run
        if result.checkpoint is None:
            raise RuntimeError(f"stage {st.name} ended without a checkpoint; the next stage has nothing to start from")
        if env.rank == 0:
            mark_stage_done(st.run_dir, name=st.name, checkpoint=result.checkpoint, steps=result.steps,
                            tokens=result.tokens)
        dist.barrier()
        prev = result.checkpoint
    if env.rank == 0:
        history, boundaries, offset = [], [], 0.0
        for st in stages:
            part = read_metrics(st.run_dir / "metrics.jsonl")
            boundaries.append((offset, st.name))
            history += [{**h, "tokens": h["tokens"] + offset} for h in part]
            offset += part[-1]["tokens"] if part else 0.0
        png = plot_loss(history, run_dir / "loss.png", boundaries=boundaries) if history else None
        say(f"staged run done: {', '.join(s.name for s in stages)}; loss curve of all stages: {png}")
        if result is not None:
            result.loss_png = png
    if result is None:  # every stage was already complete
        last = stages[-1]
        result = TrainResult(run_dir=last.run_dir, steps=0, tokens=0.0, checkpoint=prev)
    return result


def wandb_tags(cfg: TrainConfig, *, stage: str | None = None) -> list[str]:
    """Tags that tell runs apart in the wandb table: model size, layout, schedule, precision, stage."""
    p = cfg.parallel
    tags = [f"layers{cfg.model.num_hidden_layers}-d{cfg.model.hidden_size}", f"pp{p.pp}-ep{p.ep}",
            p.schedule if p.pp > 1 else "no-pp", f"seq{cfg.seq_len}", str(cfg.precision)]
    return tags + ([f"stage:{stage}"] if stage else [])


def _train(
    cfg: TrainConfig, *, env: DistEnv, device: torch.device, data_cfg: Any, run_name: str, run_dir: Path,
    pre: _Preflight, resolved_yaml: str | None, start_from: tuple[Path, bool] | None = None,
    stage: str | None = None, stage_index: int = 0, wandb_group: str | None = None,
) -> TrainResult:
    """One run folder's training (a plain run, or one stage). `start_from`: (checkpoint, carry the
    optimizer) for a stage that starts from the previous one's final checkpoint."""
    autocast_dtype = resolve_precision(cfg, device)
    ckpt_dir, resume_from, changed_settings, fingerprint = pre.ckpt_dir, pre.resume_from, pre.changed_settings, pre.fingerprint
    rank0 = env.rank == 0
    say = log.info if rank0 else (lambda *a, **k: None)
    say_warn = log.warning if rank0 else (lambda *a, **k: None)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        import numpy as np

        np.random.seed(cfg.seed)
    except ImportError:
        pass
    executor = build_executor(cfg, env=env, device=device, autocast_dtype=autocast_dtype)
    model, optimizer, mesh = executor.model, executor.optimizer, executor.mesh
    dp_rank, dp_size = mesh.data_rank, mesh.data_parallel  # data-parallel replicas (the cp ranks of one share it)
    if env.world_size > 1:
        log.info(executor.describe())  # every rank: what it holds
    mb = cfg.parallel.micro_batch_size
    loader = build_loader(data_cfg, seq_len=cfg.seq_len, micro_batch_size=mb, dp_rank=dp_rank, dp_size=dp_size)
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {loader.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size>={loader.vocab_size}"
        )
    multiple = mb * dp_size  # sequences of one micro-batch on every data-parallel rank
    sched = cfg.schedule
    # every ramp value is a global batch the pipeline schedule accepts (validate_config checked the whole ramp)
    gran = batch_granularity(schedule=cfg.parallel.schedule, pp=cfg.parallel.pp, micro_batch_size=mb, dp=dp_size)
    plan = plan_run(sched, seq_len=cfg.seq_len, gran=gran)

    step, tokens = 0, 0.0
    if resume_from is not None:
        state = load_training_state(resume_from, executor)  # any layout: the state reshards on load
        step, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["loader"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        else:
            say(f"note: {resume_from.name} holds no RNG state for rank {env.rank} (another world size); "
                "the RNG keeps its seed")
    elif start_from is not None and start_from[1]:
        load_model_and_optimizer(start_from[0], executor)
        say(f"model and optimizer state from {start_from[0]}; fresh schedule and data")
    elif start_from is not None or cfg.checkpoint.init_from:
        source_path = str(start_from[0]) if start_from is not None else cfg.checkpoint.init_from
        assert source_path is not None
        source = init_weights_from(source_path, executor)
        say(f"weights from {source_path} ({source}); fresh optimizer, schedule and data")

    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resolved_yaml is None:
            from omegaconf import OmegaConf

            resolved_yaml = OmegaConf.to_yaml(OmegaConf.structured(dataclasses.replace(cfg, data=data_cfg)))
        _save_text_atomic(run_dir / "config.yaml", resolved_yaml)
        # the metric log continues from the resumed step (records a killed run wrote after it are dropped)
        kept = [h for h in read_metrics(run_dir / "metrics.jsonl") if h["step"] <= step]
        _save_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in kept))
        pc = count_parameters(cfg.model)
        n_params = sum(p.numel() for p in model.parameters())
        first_batch = global_batch_at(tokens=0, sched=sched, gran=gran)
        last_batch = global_batch_at(tokens=float("inf"), sched=sched, gran=gran)
        say(f"run {run_name!r} in {run_dir}")
        say(f"ranks {env.world_size} ({mesh.describe_degrees()}, backend {dist.get_backend()}), device {device}, "
            f"precision {'bf16 autocast' if autocast_dtype is not None else 'fp32'}"
            + (" with FP8 GEMMs in the blocks" if cfg.precision == "fp8" else ""))
        say(f"model: {_fmt(pc.total)} parameters ({_fmt(pc.activated)} activated per token) + MTP {_fmt(pc.mtp)}; "
            f"{_fmt(n_params)} in this replica; optimizer groups "
            + ", ".join(f"{g['group']} {len(g['params'])}" for g in optimizer.param_groups))
        say(f"data: {type(data_cfg).__name__}, vocab {loader.vocab_size}, seq_len {cfg.seq_len}, "
            f"micro-batch {mb} sequences")
        say(f"batch: {first_batch} -> {last_batch} sequences in steps of {gran.multiple} "
            f"({_fmt(first_batch * cfg.seq_len)} -> {_fmt(last_batch * cfg.seq_len)} tokens/step, "
            f"{first_batch // multiple} -> {last_batch // multiple} accumulation micro-batches per rank), "
            f"ramp ends at step {plan.ramp_end_step}")
        if (note := ramp_note(sched, gran=gran)) is not None:
            log.warning(note)
        say(f"schedule: {plan.total_steps} steps, {_fmt(plan.total_tokens)} tokens; warmup {sched.warmup_steps} "
            f"steps (ends at {_fmt(plan.warmup_end_tokens)} tokens); peak lr {cfg.optim.lr:g}")
        if resume_from is not None:
            say(f"resumed from {resume_from} at step {step}, {_fmt(tokens)} tokens")
            for line in changed_settings:
                say(f"  changed setting (checkpoint.allow_changed_settings=true), applies from step {step + 1}: "
                    f"{line}")

    perf: PerfRef | None = None
    if rank0:
        peak, peak_src = device_peak_flops(device, bf16=autocast_dtype is not None)
        perf = PerfRef(flops_per_token=model_flops_per_token(cfg.model, seq_len=cfg.seq_len), peak_flops=peak,
                       ranks=env.world_size, node_limit=int(executor.plan.max_nodes_per_token or 1),
                       stage_index=stage_index, device=device)
        say(f"MFU against {peak / 1e12:.4g} TFLOP/s per rank ({peak_src}); the model: "
            f"{perf.flops_per_token / 1e9:.4g} GFLOP per token (forward + backward)")
    wandb = (
        WandbLogger(cfg.logging.wandb, run_dir=run_dir, run_name=run_name,
                    config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                    group=wandb_group, tags=wandb_tags(cfg, stage=stage))
        if rank0 else None
    )
    heat_names = list(global_router_names(cfg.model))
    heat_rows = list(global_router_names(cfg.model).values())
    heatmap_png = run_dir / "expert_load_heatmap.png"

    def heatmap(m: StepMetrics, at_step: int) -> None:
        assert wandb is not None
        if cfg.logging.expert_heatmap_png and heat_rows and m.expert_load_RE is not None and m.expert_load_RE.numel():
            png = plot_expert_heatmap(m.expert_load_RE[heat_rows], heat_names, heatmap_png, step=at_step)
            wandb.log_images({"load/heatmap": png}, step=at_step)
    metrics_file = open(run_dir / "metrics.jsonl", "a") if rank0 else None  # noqa: SIM115
    last_ckpt: Path | None = resume_from
    writer = CheckpointWriter(ckpt_dir, keep_last=cfg.checkpoint.keep_last, async_save=cfg.checkpoint.async_save,
                              timeout_s=cfg.parallel.collective_timeout_s)

    def save(at_step: int, at_tokens: float) -> Path:
        entries = training_entries(executor, step=at_step, tokens=at_tokens, loader_state=loader.state_dict())
        meta = {"step": at_step, "tokens": at_tokens, "world_size": env.world_size, "fingerprint": fingerprint,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "weights_only": False,
                **checkpoint_meta(cfg, world_size=env.world_size)}
        return writer.save(at_step, entries, meta=meta)

    def save_periodic(at_step: int, at_tokens: float) -> Path | None:
        """A periodic save that cannot be written costs that checkpoint, not the run."""
        try:
            return save(at_step, at_tokens)
        except CheckpointWriteFailed as e:
            say_warn(f"{e}; training goes on")
            return None

    skips = SkipGuard(spike_factor=cfg.guards.loss_spike_factor, window=cfg.guards.loss_spike_window)
    t_start = time.perf_counter()
    timeline_png: str | None = None
    steps_at_start, tokens_at_start = step, tokens
    window: list[dict[str, float]] = []
    watch = PreemptionWatch()
    try:
        watch.install()
        while step < plan.total_steps:
            t0 = time.perf_counter()
            batch = global_batch_at(tokens=tokens, sched=sched, gran=gran)
            micro = [next(loader) for _ in range(batch // multiple)]
            lr = lr_at(step=step, tokens=tokens, peak=cfg.optim.lr, min_ratio=cfg.optim.min_lr_ratio, sched=sched)
            mtp_w = mtp_weight_at(tokens=tokens, sched=sched)
            gamma = bias_update_speed_at(tokens=tokens, sched=sched)
            # One measured pipeline timeline per run: the second step (the first pays for warm-up).
            record = step == steps_at_start + 1
            if record:
                executor.record_next_step = True
            try:
                m = executor.run(micro, lr=lr, mtp_weight=mtp_w, bias_update_speed=gamma)
            except RuntimeError as e:  # torch.distributed's errors are RuntimeErrors
                failure = _collective_failure(e, rank=env.rank, step=step + 1, timeout_s=cfg.parallel.collective_timeout_s)
                if failure is e:
                    raise
                raise failure from e
            if record:
                executor.record_next_step = False
                timeline_png = executor.save_timeline_png(
                    str(run_dir / "pipeline_timeline.png"),
                    title=f"{cfg.parallel.schedule}, pp={cfg.parallel.pp} ep={cfg.parallel.ep}: step {step + 1}",
                )
            step += 1
            tokens += m.tokens
            step_s = time.perf_counter() - t0
            if m.skipped:  # the same on every rank (world reductions): every rank counts and decides alike
                skips.record_skip(step, m, say=log.warning if rank0 else (lambda *a, **k: None))
                if skips.consecutive >= cfg.guards.max_consecutive_skips:
                    last_ckpt = save(step, tokens)  # parameters and moments: the last good step's
                    writer.wait()
                    raise NonFiniteTraining(
                        f"{skips.consecutive} steps in a row had a non-finite loss or gradient norm (steps "
                        f"{step - skips.consecutive + 1}-{step}; guards.max_consecutive_skips="
                        f"{cfg.guards.max_consecutive_skips}): training stopped. {last_ckpt} holds the last good "
                        "parameters and optimizer state, with the data position after the skipped batches; lower "
                        "optim.lr or check the data, then relaunch to resume from it"
                    )
            else:
                spike = skips.record_loss(m.loss)
                if spike is not None and rank0:
                    log.warning(f"step {step}: loss spike, {m.loss:.4f} > {cfg.guards.loss_spike_factor:g} x the "
                                f"median {spike:.4f} of the last {cfg.guards.loss_spike_window} steps")
            if rank0:
                h = _history_entry(step, tokens, m, lr=lr, mtp_weight=mtp_w, gamma=gamma, batch=batch, step_s=step_s,
                                   perf=perf)
                window.append(h)
                assert metrics_file is not None and wandb is not None
                metrics_file.write(json.dumps(h) + "\n")
                metrics_file.flush()
                if step % cfg.logging.wandb_every == 0 or step == plan.total_steps:
                    wandb.log(h, step=step)
                every_heat = cfg.logging.heatmap_every
                if step == plan.total_steps or (every_heat and step % every_heat == 0):
                    heatmap(m, step)
                if step % cfg.logging.console_every == 0 or step == plan.total_steps or step == steps_at_start + 1:
                    elapsed = time.perf_counter() - t_start
                    eta = elapsed / max(tokens - tokens_at_start, 1.0) * (plan.total_tokens - tokens)
                    tps = sum(w["tokens_per_s"] * w["step_time_s"] for w in window) / sum(
                        w["step_time_s"] for w in window)
                    load = (f" | load max/mean {h['load/imbalance_mean']:.2f} (worst {h['load/imbalance_max']:.2f})"
                            if "load/imbalance_mean" in h else "")
                    say(f"step {step}/{plan.total_steps} | tokens {_fmt(tokens)} | lm {m.lm:.4f} mtp {m.mtp:.4f} "
                        f"bal {m.balance:.2e} | lr {lr:.3g} | gnorm {m.grad_norm:.3f} | {_fmt(tps)} tok/s"
                        f"{load} | batch {batch} | ETA {_fmt_time(eta)}")
                    window = []
            every = cfg.checkpoint.every_steps
            if every > 0 and step % every == 0 and step < plan.total_steps:
                last_ckpt = save_periodic(step, tokens) or last_ckpt
            if (sig := watch.agreed(device=device)) is not None and step < plan.total_steps:
                if last_ckpt is None or last_ckpt.name != f"step_{step:08d}":
                    last_ckpt = save(step, tokens)  # a failure here raises: the requeue then resumes earlier
                writer.wait()
                say(f"{sig.name}: stopped after step {step}/{plan.total_steps} with the checkpoint {last_ckpt}; "
                    "relaunch (or let the job requeue) to resume from it")
                raise Preempted(step=step, signal_name=sig.name, checkpoint=last_ckpt)
        if cfg.checkpoint.at_end and (last_ckpt is None or last_ckpt.name != f"step_{step:08d}"):
            last_ckpt = save(step, tokens)
        writer.wait()
        if skips.total:
            say(f"skipped steps (non-finite loss or gradient norm): {skips.total}")
        if writer.blocking_s:
            say(f"checkpoints: {len(writer.blocking_s)} saved, training waited {sum(writer.blocking_s):.2f} s for them"
                + (" (asynchronous)" if writer.async_save else ""))
    except BaseException:
        if wandb is not None:
            wandb.finish()  # flushed: the history of a preempted or failed attempt is not lost
        raise
    finally:
        watch.restore()
        if metrics_file is not None:
            metrics_file.close()

    result = TrainResult(run_dir=run_dir, steps=step, tokens=tokens, checkpoint=last_ckpt)
    if rank0:
        assert wandb is not None
        history = result.history = read_metrics(run_dir / "metrics.jsonl")
        result.wandb_dir = wandb.run_path
        if cfg.logging.loss_png:
            result.loss_png = plot_loss(history, run_dir / "loss.png")
        if cfg.logging.expert_load_png:
            result.expert_load_png = plot_expert_load(history, run_dir / "expert_load.png")
        wandb.log_images({"plots/loss": result.loss_png, "plots/expert_load": result.expert_load_png,
                          "plots/pipeline_timeline": Path(timeline_png) if timeline_png else None,
                          "plots/expert_load_heatmap": heatmap_png if heatmap_png.is_file() else None})
        wandb.finish()
        wall = time.perf_counter() - t_start
        if step == steps_at_start:
            say(f"nothing to do: the run is complete at step {step} (schedule length {plan.total_steps}); "
                "set a new run_dir or extend schedule.train_steps / train_tokens to continue")
        else:
            first, last = history[0], history[-1]
            say(f"done: {step - steps_at_start} steps in {_fmt_time(wall)}; LM loss {first['loss/lm']:.3f} "
                f"(step {first['step']:.0f}) -> {last['loss/lm']:.3f} (step {last['step']:.0f})")
        say("results:")
        say(f"  run folder : {run_dir}  (config.yaml, metrics.jsonl)")
        say(f"  checkpoint : {last_ckpt}")
        say(f"  loss curve : {result.loss_png}")
        if result.expert_load_png:
            say(f"  expert load: {result.expert_load_png}")
        if timeline_png:
            say(f"  pipeline   : {timeline_png}  (measured per-rank timeline of one step)")
        mode = wandb.mode
        say(f"  wandb ({mode}): {result.wandb_dir}"
            + (f"  (upload with: wandb sync {result.wandb_dir})" if mode == "offline" and result.wandb_dir else ""))
    return result
