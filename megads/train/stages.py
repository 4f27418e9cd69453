"""Staged runs: the stage list of a config as one TrainConfig per stage, and where each stage lives.

A staged run (`stages=tiny_extension`, `stages=deepseek_v3`) is a sequence of ordinary runs in
sub-folders of the run folder, one per stage, trained one after the other in the same job:

    <run_dir>/stages/<name>/       a complete run folder (config.yaml, metrics.jsonl, checkpoints/)
    <run_dir>/stages/<name>/stage_done.json
                                   written last, when the stage is complete: its final checkpoint
    <run_dir>/loss.png             every stage's loss, stage boundaries marked

A stage's config is the run's config with the stage's value overrides applied (Hydra's override
syntax and types, so `model.rope_scaling={type:yarn,...}` or `parallel.pp=8` is checked against
the schema like a command-line override); all of them are validated before any process group
starts. The first stage starts like a plain run (fresh, or `checkpoint.init_from`); each later
one from the previous stage's final checkpoint: model and optimizer state when
`carry_optimizer`, weights only otherwise; its schedule, step count and data start afresh.
Relaunched, a job skips the stages with `stage_done.json` and resumes the first unfinished
stage from its own newest checkpoint (or starts it from the previous stage's), so a finished
stage is never rerun. `stages.start` / `stages.stop` cut the list for one job per stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megads.train.config import ConfigError, StagesConfig, StageSpec, TrainConfig

DONE_FILE = "stage_done.json"


@dataclass
class Stage:
    """One stage of this job: its config, folder and where it starts from."""

    index: int  # position in the full stage list
    total: int  # stages in the full list
    spec: StageSpec
    cfg: TrainConfig
    run_dir: Path

    @property
    def name(self) -> str:
        return self.spec.name


def stage_config(base: TrainConfig, spec: StageSpec, *, where: str) -> TrainConfig:
    """`base` with the value overrides of `spec` (no stages of its own, no init_from)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from megads.model.config import RopeScalingConfig
    from megads.train.config import to_train_config

    plain = dataclasses.replace(base, stages=StagesConfig())
    node = OmegaConf.structured(plain)
    if node.model.rope_scaling is None:  # the mergeable form of plain RoPE (see RopeScalingConfig)
        node.model.rope_scaling = RopeScalingConfig(type="none")
    try:
        overrides = OverridesParser.create().parse_overrides(list(spec.overrides))
    except HydraException as e:
        raise ConfigError(f"{where}.overrides: {e}") from None
    for o in overrides:
        text = o.input_line or o.key_or_group
        if o.type != OverrideType.CHANGE or o.is_sweep_override() or o.package is not None:
            raise ConfigError(f"{where}.overrides: {text!r}: a stage takes plain `key=value` overrides only "
                              "(no +/~ prefixes, sweeps or packages)")
        key = o.key_or_group
        if "." not in key and OmegaConf.is_config(node.get(key)):
            raise ConfigError(f"{where}.overrides: {text!r} chooses a config group; a stage can set values only "
                              f"(e.g. {key}.<field>=...), the group is the run's")
        try:
            OmegaConf.update(node, key, o.value(), merge=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{where}.overrides: {text!r}: {str(e).splitlines()[0]}") from None
    cfg = to_train_config(node)
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=None))


def plan_stages(cfg: TrainConfig, *, run_dir: Path) -> list[Stage]:
    """The stages this job runs, in order ([] for a run without stages). ConfigError naming the
    stage for a bad override, a duplicate name or an unknown `stages.start` / `stop`."""
    specs = list(cfg.stages.list)
    if not specs:
        if cfg.stages.start or cfg.stages.stop:
            raise ConfigError("stages.start / stages.stop are set but stages.list is empty; choose a stages preset "
                              "(stages=tiny_extension, stages=deepseek_v3) or drop them")
        return []
    names = [s.name for s in specs]
    for i, name in enumerate(names):
        if not name or name == "???" or "/" in name or name != name.strip():
            raise ConfigError(f"stages.list[{i}].name={name!r}: give every stage a plain folder name")
        if names.count(name) > 1:
            raise ConfigError(f"stages.list: the name {name!r} occurs {names.count(name)} times; names must differ")

    def index_of(field: str) -> int | None:
        value = getattr(cfg.stages, field)
        if value is None:
            return None
        if value not in names:
            raise ConfigError(f"stages.{field}={value!r} is not a stage of this run; choose one of {names}")
        return names.index(value)

    lo, hi = index_of("start"), index_of("stop")
    lo, hi = (0 if lo is None else lo), (len(specs) - 1 if hi is None else hi)
    if hi < lo:
        raise ConfigError(f"stages.stop={names[hi]!r} comes before stages.start={names[lo]!r}")
    if lo > 0 and not cfg.checkpoint.init_from:
        raise ConfigError(
            f"stages.start={names[lo]!r} skips the stages before it: set checkpoint.init_from to the checkpoint "
            f"it starts from (the final checkpoint of stage {names[lo - 1]!r}: <run_dir>/stages/{names[lo - 1]}/"
            f"{DONE_FILE} names it)"
        )
    out = []
    for i in range(lo, hi + 1):
        scfg = stage_config(cfg, specs[i], where=f"stages.list[{i}] ({names[i]})")
        if i == lo and cfg.checkpoint.init_from:
            scfg = dataclasses.replace(scfg, checkpoint=dataclasses.replace(scfg.checkpoint,
                                                                            init_from=cfg.checkpoint.init_from))
        sdir = run_dir / "stages" / names[i]
        # a stage always ends with a checkpoint in its own folder: the next stage starts from it
        scfg = dataclasses.replace(scfg, run_dir=str(sdir),
                                   checkpoint=dataclasses.replace(scfg.checkpoint, dir=None, at_end=True))
        out.append(Stage(index=i, total=len(specs), spec=specs[i], cfg=scfg, run_dir=sdir))
    return out


def stage_done(stage_dir: Path) -> dict[str, Any] | None:
    """The completion record of a finished stage, or None."""
    path = stage_dir / DONE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it to rerun the stage's end") from None


def mark_stage_done(stage_dir: Path, *, name: str, checkpoint: Path, steps: int, tokens: float) -> None:
    record = {"stage": name, "checkpoint": str(checkpoint), "steps": steps, "tokens": tokens}
    tmp = stage_dir / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, stage_dir / DONE_FILE)
