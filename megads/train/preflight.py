"""What the trainer checks before any process group starts: run folder, resume, compatibility.

A launch that is going to fail should fail in seconds, with a message that names the file or
the field and the fix, and without touching anything already in the run folder. Everything
here reads the file system and the config only (no process group, no model):

    resolve_run_dir      explicit `run_dir` > Hydra's job folder (hydra.run.dir / sweep dir)
    check_writable       the run folder (and checkpoint folder) can be created and written
    find_resume          which checkpoint a launch resumes from (checkpoint.resume)
    check_resume         a checkpoint's meta.json against this launch: ranks, the state layout
                         (pp, ep, dp, schedule, stage_layers, zero1), the fingerprint (model,
                         data, seq_len, micro-batch) and the training settings (optim.*,
                         schedule.* but the run length, precision)

What the checkpoint records is written by `checkpoint_meta` beside the step (meta.json).
Settings that do not change how state is laid out (parallel.bucket_numel,
parallel.moments_dtype) need no check: ZeRO-1 state is stored by parameter name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from megads.checkpoint.dcp import CheckpointCorrupt, completed_steps
from megads.checkpoint.writer import pick_resume
from megads.train.config import ConfigError, TrainConfig

log = logging.getLogger("megads.train")

# schedule.* fields that only set how long a run is: extending a run changes them on purpose
_RUN_LENGTH_FIELDS = ("train_tokens", "train_steps")
# data.* fields that change where the token cache lives or how fast it is read, not the tokens
_DATA_NOT_FINGERPRINTED = ("cache_dir", "prefetch", "num_preprocess_workers")


def resolve_run_dir(cfg: TrainConfig, *, job_dir: str | Path | None, run_name: str) -> Path:
    """The run folder: `run_dir` when set, else the Hydra job's folder, else outputs/<run_name>."""
    if cfg.run_dir:
        return Path(cfg.run_dir).absolute()
    if job_dir is not None:
        return Path(job_dir).absolute()
    return Path("outputs", run_name).absolute()


def check_writable(folder: Path, *, what: str) -> None:
    """Create `folder` if needed and prove a file can be written there (the probe is removed)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".megads-write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"{what} {folder} cannot be written ({e.strerror or e}); choose a writable folder "
            f"(run_dir=... / checkpoint.dir=...) or fix its permissions"
        ) from None


def find_resume(cfg: TrainConfig, *, ckpt_dir: Path) -> Path | None:
    """The checkpoint this launch resumes from (None: a fresh start); refuses what cannot work.

    `auto`: the newest step folder that verifies (`checkpoint.verify`), falling back past corrupt
    ones with a warning (megads.checkpoint.writer.pick_resume).
    """
    mode = cfg.checkpoint.resume
    try:
        if mode == "auto":
            return pick_resume(ckpt_dir, verify=cfg.checkpoint.verify)
        if mode == "never":
            existing = completed_steps(ckpt_dir)
            if existing:
                raise ConfigError(
                    f"checkpoint.resume=never but {ckpt_dir} already holds checkpoints (latest {existing[-1].name}); "
                    "new ones would mix with them: delete that folder or choose another run_dir / checkpoint.dir"
                )
            return None
        return pick_resume(ckpt_dir, explicit=Path(mode), verify=cfg.checkpoint.verify)
    except CheckpointCorrupt as e:
        raise ConfigError(f"checkpoint.resume={mode}: {e}") from None


def run_fingerprint(cfg: TrainConfig, data_cfg: Any) -> str:
    """A hash of what a resumed run must not change: model, data source, seq_len, micro-batch."""
    data = dataclasses.asdict(data_cfg) if dataclasses.is_dataclass(data_cfg) else {"repr": repr(data_cfg)}
    for where_and_how_fast in _DATA_NOT_FINGERPRINTED:  # may change between launches (e.g. node-local cache)
        data.pop(where_and_how_fast, None)
    what = {
        "model": dataclasses.asdict(cfg.model),
        "data": data,
        "seq_len": cfg.seq_len, "micro_batch_size": cfg.parallel.micro_batch_size,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def state_layout(cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """The settings that decide which rank holds which state (a resume must keep them)."""
    p = cfg.parallel
    return {"world_size": world_size, "pp": p.pp, "ep": p.ep, "cp": p.cp,
            "dp": p.data_parallel_size(world_size=world_size), "schedule": p.schedule if p.pp > 1 else None, "stage_layers": p.stage_layers, "zero1": p.zero1}


def training_settings(cfg: TrainConfig) -> dict[str, Any]:
    """optim.*, schedule.* (all but the run length) and precision, as plain JSON values."""
    sched = {k: v for k, v in dataclasses.asdict(cfg.schedule).items() if k not in _RUN_LENGTH_FIELDS}
    flat = {f"optim.{k}": v for k, v in dataclasses.asdict(cfg.optim).items()}
    flat.update({f"schedule.{k}": v for k, v in sched.items()})
    flat["precision"] = cfg.precision
    return json.loads(json.dumps(flat))


def checkpoint_meta(cfg: TrainConfig, *, world_size: int) -> dict[str, Any]:
    """What meta.json records beside the step: model config, state layout, training settings.

    `layout` is informational: the state is stored by global name and loads into any layout.
    """
    return {
        "model": dataclasses.asdict(cfg.model),
        "seq_len": cfg.seq_len,
        "layout": state_layout(cfg, world_size=world_size),
        "settings": training_settings(cfg),
    }


def _foreign_fields(meta: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """The recorded model fields and seq_len that differ from this launch's, as "field saved -> now"."""
    saved_model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    now_model = json.loads(json.dumps(dataclasses.asdict(cfg.model)))
    out = [f"model.{k} {saved_model.get(k)!r} -> {v!r}" for k, v in now_model.items()
           if saved_model and saved_model.get(k) != v]
    if "seq_len" in meta and meta["seq_len"] != cfg.seq_len:
        out.append(f"seq_len {meta['seq_len']!r} -> {cfg.seq_len!r}")
    return out


def check_resume(cfg: TrainConfig, *, resume_from: Path, world_size: int, fingerprint: str) -> list[str]:
    """Refuse a checkpoint this launch cannot continue; return the changed settings it may apply.

    Raises ConfigError naming each clashing field. Changed training settings are refused unless
    `checkpoint.allow_changed_settings=true`; then they are returned as "field: old -> new"
    lines for the log (the new values apply from the resumed step).
    """
    meta_path = resume_from / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{meta_path}: unreadable checkpoint metadata ({e}); resume from another step_* folder") from None
    saved_layout = meta.get("layout") or {}
    now = state_layout(cfg, world_size=world_size)
    saved_layout.setdefault("cp", 1)  # checkpoints from before context parallel
    moved = [f"{k} {saved_layout.get(k)!r} -> {now[k]!r}" for k in now if saved_layout.get(k) != now[k]]
    if moved:  # the state is stored by global name and reshards on load (docs/checkpoints.md)
        log.info(f"{resume_from.name}: parallel layout changed, the state is resharded on load: " + ", ".join(moved))
    if meta.get("weights_only"):
        raise ConfigError(
            f"{resume_from} holds weights only (a megads-convert folder), not a training state to resume: "
            f"start a new run_dir with checkpoint.init_from={resume_from}, or move it out of {resume_from.parent}"
        )
    if meta.get("fingerprint") != fingerprint:
        differs = _foreign_fields(meta, cfg)
        raise ConfigError(
            f"{resume_from} belongs to a run with a different model, data, seq_len or micro-batch size "
            f"than this config" + (f" ({'; '.join(differs)})" if differs else "")
            + f"; it is not loaded. Set another run_dir (or logging.run_name) for the new run, move that folder "
            f"out of {resume_from.parent} if it came from another run, or delete {resume_from.parent} to start "
            "over in this folder"
        )
    saved = meta.get("settings")
    if saved is None:
        log.warning(f"warning: {meta_path} records no training settings (older checkpoint); not compared")
        return []
    now_settings = training_settings(cfg)
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in now_settings.items() if saved.get(k) != v]
    if changed and not cfg.checkpoint.allow_changed_settings:
        raise ConfigError(
            f"{resume_from} was trained with other settings than this launch:\n    " + "\n    ".join(changed)
            + "\n  set them back to resume the same run, set checkpoint.allow_changed_settings=true to apply "
            "the new values from the resumed step on, or start a new run_dir"
        )
    return changed
