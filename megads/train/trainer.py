"""The training loop: validate, set up, run steps by the token schedule, checkpoint, report.

Order of events on every rank (torchrun env:// or a single process):

    1. validate the whole config (model, data, parallel, schedule) -- no process group yet
    2. init the process group (gloo on CPU, nccl on GPU) when WORLD_SIZE > 1
    3. seed, build the model (same seed on every rank, then a broadcast from rank 0),
       AdamW, the step executor and this rank's data loader
    4. resume from the latest checkpoint of the run folder (checkpoint.resume=auto)
    5. per step: global batch from the ramp -> this rank's micro-batches; lr, MTP weight and
       bias-update speed from the token schedule; executor.run (fwd/bwd, all-reduce, clip,
       AdamW, bias update); rank 0 logs global figures to the console, metrics.jsonl, wandb
    6. checkpoint every checkpoint.every_steps and at the end; PNGs; print where results are

The per-step work lives in a `StepExecutor` (megads.train.step) and the optimizer in
`build_optimizer` (megads.train.optim), so megads.parallel can replace both in
`make_executor` without touching the loop.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megads.model import DeepseekV3, count_parameters
from megads.parallel.train_glue import build_train_executor, describe_rank, needs_parallel_executor
from megads.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from megads.train.config import ConfigError, TrainConfig, validate_config
from megads.train.data_source import build_loader, resolve_data_config
from megads.train.monitor import WandbLogger, plot_expert_load, plot_loss
from megads.train.optim import build_optimizer
from megads.train.schedule import bias_update_speed_at, global_batch_at, lr_at, mtp_weight_at, plan_run
from megads.train.step import LocalStepExecutor, StepExecutor, StepMetrics

log = logging.getLogger("megads.train")


@dataclass
class DistEnv:
    """Rank layout read from the launcher's environment (torchrun); 1 process when absent."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> DistEnv:
        env = os.environ
        if "RANK" not in env and "SLURM_PROCID" in env:
            # started by srun without torchrun: the layout from Slurm's variables, exported for env://
            from megads.parallel.mesh import read_dist_env

            d = read_dist_env()
            env.update({"RANK": str(d.rank), "WORLD_SIZE": str(d.world_size), "LOCAL_RANK": str(d.local_rank),
                        "LOCAL_WORLD_SIZE": str(d.local_world_size)})
            env.setdefault("MASTER_ADDR", d.master_addr)
            env.setdefault("MASTER_PORT", str(d.master_port))
        return cls(
            rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)), local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )


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


def run_fingerprint(cfg: TrainConfig, data_cfg: Any) -> str:
    """A hash of what a resumed run must not change: model, data source, seq_len, micro-batch."""
    what = {
        "model": dataclasses.asdict(cfg.model),
        "data": dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else repr(data_cfg),
        "seq_len": cfg.seq_len, "micro_batch_size": cfg.parallel.micro_batch_size,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checkpoint_meta(cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """What meta.json records beside the step: the model config and the parallel layout.

    `layout` is enough to place every rank's model file: rank = pp_rank * dp + dp_rank and
    ep_rank = dp_rank % ep (megads.parallel.mesh); routed-expert tensors of a rank hold the
    experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) along dim 0.
    """
    p = cfg.parallel
    return {
        "model": dataclasses.asdict(cfg.model),
        "layout": {"pp": p.pp, "ep": p.ep, "dp": p.data_parallel_size(world_size=world_size),
                   "schedule": p.schedule, "stage_layers": p.stage_layers, "zero1": p.zero1},
    }


def resolve_device(cfg: TrainConfig, env: DistEnv) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=auto or device=cpu")
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain float32)."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def check_supported_layout(cfg: TrainConfig, *, rank: int, world_size: int = 1) -> None:
    """Warn about what the local (plain data-parallel) executor cannot honour.

    Layouts with pp > 1, ep > 1, or ZeRO-1 on several ranks run on megads.parallel's executor,
    which honours every parallel.* field.
    """
    p = cfg.parallel
    if needs_parallel_executor(p, world_size=world_size):
        return
    if rank == 0:
        ignored = [n for n, v in (("zero1", p.zero1), ("moments_dtype", p.moments_dtype != "float32"),
                                  ("stage_layers", p.stage_layers is not None)) if v]
        if ignored:
            log.warning(
                f"warning: parallel.{', parallel.'.join(ignored)} ignored: the local executor keeps full "
                "float32 optimizer state on every data-parallel rank (megads.parallel brings ZeRO-1)"
            )


def make_executor(
    cfg: TrainConfig, model: DeepseekV3, *, device: torch.device, autocast_dtype: torch.dtype | None,
    group: dist.ProcessGroup | None,
) -> tuple[StepExecutor, torch.optim.Optimizer]:
    """The step executor and optimizer of this layout (the hook megads.parallel replaces)."""
    optimizer = build_optimizer(model.named_parameters(), cfg.optim, device_type=device.type)
    executor = LocalStepExecutor(
        model, optimizer, clip_grad=cfg.optim.clip_grad, device=device, autocast_dtype=autocast_dtype, group=group
    )
    return executor, optimizer


def _broadcast_parameters(model: torch.nn.Module) -> None:
    tensors = list(model.parameters()) + list(model.buffers())
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def _save_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The per-step records of <run_dir>/metrics.jsonl ([] when absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _history_entry(step: int, tokens: float, m: StepMetrics, *, lr: float, mtp_weight: float, gamma: float,
                   batch: int, step_s: float) -> dict[str, float]:
    h: dict[str, float] = {
        "step": step, "tokens": tokens, "loss/total": m.loss, "loss/lm": m.lm, "loss/mtp": m.mtp,
        "loss/balance": m.balance, "lr": lr, "grad_norm": m.grad_norm, "tokens_per_s": m.tokens / max(step_s, 1e-9),
        "batch_sequences": batch, "mtp_weight": mtp_weight, "bias_update_speed": gamma, "step_time_s": step_s,
    }
    if m.expert_load:
        imb = {name: s.imbalance for name, s in m.expert_load.items()}
        for name, v in imb.items():
            h[f"load/imbalance/{name.removesuffix('.mlp.gate')}"] = v
        h["load/imbalance_mean"] = sum(imb.values()) / len(imb)
        h["load/imbalance_max"] = max(imb.values())
    return h


def train(cfg: TrainConfig, *, run_name: str | None = None, resolved_yaml: str | None = None) -> TrainResult:
    """Run (or resume) the training job `cfg` on this rank; collective under torchrun."""
    env = DistEnv.from_env()
    validate_config(cfg, world_size=env.world_size)
    check_supported_layout(cfg, rank=env.rank, world_size=env.world_size)
    data_cfg = resolve_data_config(cfg.data)
    device = resolve_device(cfg, env)
    autocast_dtype = resolve_precision(cfg, device)
    run_name = cfg.logging.run_name or run_name or "run"
    run_dir = Path(cfg.run_dir or os.path.join("outputs", run_name)).absolute()
    ckpt_dir = Path(cfg.checkpoint.dir).absolute() if cfg.checkpoint.dir else run_dir / "checkpoints"
    resume_from: Path | None = None
    if cfg.checkpoint.resume == "auto":
        resume_from = latest_checkpoint(ckpt_dir)
    elif cfg.checkpoint.resume == "never":
        existing = latest_checkpoint(ckpt_dir)
        if existing is not None:
            raise ConfigError(
                f"checkpoint.resume=never but {ckpt_dir} already holds checkpoints (latest {existing.name}); "
                "new ones would mix with them: delete that folder or choose another run_dir / checkpoint.dir"
            )
    else:
        resume_from = Path(cfg.checkpoint.resume)
        if not (resume_from / "meta.json").is_file():
            raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume!r} is not a completed step_* checkpoint folder")
    fingerprint = run_fingerprint(cfg, data_cfg)
    if resume_from is not None:
        meta = json.loads((resume_from / "meta.json").read_text())
        if meta.get("world_size") != env.world_size:
            raise ConfigError(
                f"{resume_from} was written by {meta.get('world_size')} ranks, this launch has {env.world_size}; "
                f"resume with {meta.get('world_size')} ranks, or start afresh with another run_dir"
            )
        if meta.get("fingerprint") != fingerprint:
            raise ConfigError(
                f"{resume_from} belongs to a run with a different model, data, seq_len or micro-batch size "
                f"than this config; set another run_dir (or logging.run_name) for the new run, or delete "
                f"{ckpt_dir} to start over in this folder"
            )

    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    group: dist.ProcessGroup | None = None
    if env.world_size > 1:
        backend = cfg.parallel.resolve_backend(cuda=device.type == "cuda")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
        group = dist.group.WORLD
    try:
        return _train(cfg, env=env, device=device, autocast_dtype=autocast_dtype, group=group, data_cfg=data_cfg,
                      run_name=run_name, run_dir=run_dir, ckpt_dir=ckpt_dir, resume_from=resume_from,
                      resolved_yaml=resolved_yaml, fingerprint=fingerprint)
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, *, env: DistEnv, device: torch.device, autocast_dtype: torch.dtype | None,
    group: dist.ProcessGroup | None, data_cfg: Any, run_name: str, run_dir: Path, ckpt_dir: Path,
    resume_from: Path | None, resolved_yaml: str | None, fingerprint: str,
) -> TrainResult:
    rank0 = env.rank == 0
    say = log.info if rank0 else (lambda *a, **k: None)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    try:
        import numpy as np

        np.random.seed(cfg.seed)
    except ImportError:
        pass
    executor: StepExecutor
    if group is not None and needs_parallel_executor(cfg.parallel, world_size=env.world_size):
        # pipeline / expert parallel / ZeRO-1: megads.parallel builds this rank's share of the
        # model (same initial weights as DeepseekV3(cfg.model) under cfg.seed) and its optimizer
        try:
            pex, mesh = build_train_executor(
                cfg, world_size=env.world_size, local_world_size=env.local_world_size, device=device,
                autocast_dtype=autocast_dtype,
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        executor, model, optimizer = pex, pex.model, pex.optimizer
        dp_rank, dp_size = mesh.dp_rank, mesh.dp
        sharded, full_model_on_rank0 = True, cfg.parallel.pp == 1 and cfg.parallel.ep == 1
        log.info(describe_rank(pex))  # every rank: what it holds
    else:
        model = DeepseekV3(cfg.model).to(device)
        if group is not None:
            _broadcast_parameters(model)
        executor, optimizer = make_executor(cfg, model, device=device, autocast_dtype=autocast_dtype, group=group)
        dp_rank, dp_size = env.rank, cfg.parallel.data_parallel_size(world_size=env.world_size)
        sharded, full_model_on_rank0 = False, True
    mb = cfg.parallel.micro_batch_size
    loader = build_loader(data_cfg, seq_len=cfg.seq_len, micro_batch_size=mb, dp_rank=dp_rank, dp_size=dp_size)
    if loader.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {loader.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
            f"set model.vocab_size>={loader.vocab_size}"
        )
    multiple = mb * dp_size
    sched = cfg.schedule
    plan = plan_run(sched, seq_len=cfg.seq_len, multiple=multiple)

    step, tokens = 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, rank=env.rank, world_size=env.world_size, model=model,
                                optimizer=optimizer, sharded=sharded)
        step, tokens = state["step"], state["tokens"]
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])

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
        first_batch = global_batch_at(tokens=0, sched=sched, multiple=multiple)
        say(f"run {run_name!r} in {run_dir}")
        say(f"ranks {env.world_size} (data parallel {dp_size}, backend "
            f"{dist.get_backend() if group is not None else 'none'}), device {device}, "
            f"precision {'bf16 autocast' if autocast_dtype is not None else 'fp32'}")
        say(f"model: {_fmt(pc.total)} parameters ({_fmt(pc.activated)} activated per token) + MTP {_fmt(pc.mtp)}; "
            f"{_fmt(n_params)} in this replica; optimizer groups "
            + ", ".join(f"{g['group']} {len(g['params'])}" for g in optimizer.param_groups))
        say(f"data: {type(data_cfg).__name__}, vocab {loader.vocab_size}, seq_len {cfg.seq_len}, "
            f"micro-batch {mb} sequences")
        say(f"batch: {first_batch} -> {sched.batch_end} sequences ({_fmt(first_batch * cfg.seq_len)} -> "
            f"{_fmt(sched.batch_end * cfg.seq_len)} tokens/step, {first_batch // multiple} -> "
            f"{sched.batch_end // multiple} accumulation micro-batches per rank), ramp ends at step "
            f"{plan.ramp_end_step}")
        say(f"schedule: {plan.total_steps} steps, {_fmt(plan.total_tokens)} tokens; warmup {sched.warmup_steps} "
            f"steps (ends at {_fmt(plan.warmup_end_tokens)} tokens); peak lr {cfg.optim.lr:g}")
        if resume_from is not None:
            say(f"resumed from {resume_from} at step {step}, {_fmt(tokens)} tokens")

    wandb = (
        WandbLogger(cfg.logging.wandb, run_dir=run_dir, run_name=run_name,
                    config=json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
        if rank0 else None
    )
    metrics_file = open(run_dir / "metrics.jsonl", "a") if rank0 else None  # noqa: SIM115
    last_ckpt: Path | None = resume_from
    t_start = time.perf_counter()
    timeline_png: str | None = None
    steps_at_start, tokens_at_start = step, tokens
    window: list[dict[str, float]] = []
    try:
        while step < plan.total_steps:
            t0 = time.perf_counter()
            batch = global_batch_at(tokens=tokens, sched=sched, multiple=multiple)
            micro = [next(loader) for _ in range(batch // multiple)]
            lr = lr_at(step=step, tokens=tokens, peak=cfg.optim.lr, min_ratio=cfg.optim.min_lr_ratio, sched=sched)
            mtp_w = mtp_weight_at(tokens=tokens, sched=sched)
            gamma = bias_update_speed_at(tokens=tokens, sched=sched)
            # One measured pipeline timeline per run: the second step (the first pays for warm-up).
            record = hasattr(executor, "record_next_step") and step == steps_at_start + 1
            if record:
                executor.record_next_step = True
            m = executor.run(micro, lr=lr, mtp_weight=mtp_w, bias_update_speed=gamma)
            if record:
                executor.record_next_step = False
                timeline_png = executor.save_timeline_png(
                    str(run_dir / "pipeline_timeline.png"),
                    title=f"{cfg.parallel.schedule}, pp={cfg.parallel.pp} ep={cfg.parallel.ep}: step {step + 1}",
                )
            step += 1
            tokens += m.tokens
            step_s = time.perf_counter() - t0
            if rank0:
                h = _history_entry(step, tokens, m, lr=lr, mtp_weight=mtp_w, gamma=gamma, batch=batch, step_s=step_s)
                window.append(h)
                assert metrics_file is not None and wandb is not None
                metrics_file.write(json.dumps(h) + "\n")
                metrics_file.flush()
                if step % cfg.logging.wandb_every == 0 or step == plan.total_steps:
                    wandb.log(h, step=step)
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
                last_ckpt = save_checkpoint(
                    ckpt_dir, step=step, tokens=tokens, rank=env.rank, world_size=env.world_size, model=model,
                    optimizer=optimizer, loader_state=loader.state_dict(), keep_last=cfg.checkpoint.keep_last,
                    fingerprint=fingerprint, sharded=sharded, full_model_on_rank0=full_model_on_rank0,
                    extra_meta=checkpoint_meta(cfg, world_size=env.world_size),
                )
        if cfg.checkpoint.at_end and (last_ckpt is None or last_ckpt.name != f"step_{step:08d}"):
            last_ckpt = save_checkpoint(
                ckpt_dir, step=step, tokens=tokens, rank=env.rank, world_size=env.world_size, model=model,
                optimizer=optimizer, loader_state=loader.state_dict(), keep_last=cfg.checkpoint.keep_last,
                fingerprint=fingerprint, sharded=sharded, full_model_on_rank0=full_model_on_rank0,
                extra_meta=checkpoint_meta(cfg, world_size=env.world_size),
            )
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if wandb is not None:
            wandb.finish()

    result = TrainResult(run_dir=run_dir, steps=step, tokens=tokens, checkpoint=last_ckpt)
    if rank0:
        assert wandb is not None
        history = result.history = read_metrics(run_dir / "metrics.jsonl")
        result.wandb_dir = wandb.run_path
        if cfg.logging.loss_png:
            result.loss_png = plot_loss(history, run_dir / "loss.png")
        if cfg.logging.expert_load_png:
            result.expert_load_png = plot_expert_load(history, run_dir / "expert_load.png")
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
