"""megads' own model-weights folder: `model.safetensors` (our parameter names) + `model_config.json`.

This is what `megads-convert from-hf` writes and `to-hf` reads; the trainer's checkpoints hold
the same state-dict names (see docs/training.md), so either can be exported.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megads.convert.atomic import atomic_folder
from megads.model.config import ModelConfig, RopeScalingConfig
from megads.model.transformer import DeepseekV3

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"


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


def save_native(model: DeepseekV3, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    with atomic_folder(Path(path), overwrite=overwrite) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "megads"})
        (tmp / CONFIG_FILE).write_text(config_to_json(model.cfg))


def load_native(path: str | os.PathLike[str]) -> DeepseekV3:
    src = Path(path)
    cfg_file, weights = src / CONFIG_FILE, src / WEIGHTS_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise ValueError(f"{f}: not found; a megads model folder holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg = config_from_json(cfg_file.read_text(), source=str(cfg_file))
    model = DeepseekV3(cfg)
    state = load_file(str(weights))
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("tokens_per_expert"))
    if unknown or missing:
        raise ValueError(f"{weights}: unknown tensors {unknown[:5]}, missing tensors {missing[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{weights}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)
    return model.to(torch.float32)
