"""The model config as JSON: what meta.json of a checkpoint folder records under "model"
(`dataclasses.asdict(ModelConfig)`), and how it is read back with unknown keys refused."""

from __future__ import annotations

import dataclasses
import json

from megads.model.config import ModelConfig, RopeScalingConfig


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)


def config_from_json(text: str, *, source: str) -> ModelConfig:
    raw = json.loads(text)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown model config keys {unknown}")
    if raw.get("rope_scaling") is not None:
        raw["rope_scaling"] = RopeScalingConfig(**raw["rope_scaling"])
    cfg = ModelConfig(**raw)
    cfg.validate()
    return cfg
