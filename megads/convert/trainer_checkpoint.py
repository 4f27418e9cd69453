"""A trainer checkpoint (`<run>/checkpoints/step_XXXXXXXX/`) as one single-process model.

What a step folder holds (written by `megads.train.checkpoint.save_checkpoint`):

    meta.json               written last: format, step, world_size, and (since the parallel
                            trainer) "model" = the ModelConfig fields and "layout" =
                            {pp, ep, dp, schedule, stage_layers, zero1}
    model.pt                the whole model's state_dict, rank 0 (layouts with pp = ep = 1), or
    model_rank_XXXXX.pt     one per rank (pp > 1 or ep > 1): that rank's pruned stage model

A rank's state_dict uses the single-process names: pipeline stages delete the layers they do not
own but keep the global layer index (`layers.3.…`, a string-keyed ModuleDict), the first stage
holds `embed_tokens`, the last `norm`, `lm_head`, `mtp` (and, with pp > 1, a copy of
`embed_tokens` for MTP). Under expert parallel every routed-expert parameter
(`…mlp.experts.gate_up_proj.weight` [E, 2I, D], `…mlp.experts.down_proj.weight` [E, D, I]) holds
this rank's E/ep experts, sliced along dim 0 (`megads.parallel.expert_parallel.shard_experts`).

Which rank holds which experts follows the mesh's rank order (`megads.parallel.mesh`):

    rank = pp_rank * dp + dp_rank,   dp_rank = edp_rank * ep + ep_rank,
    experts of ep_rank: [ep_rank * E/ep, (ep_rank + 1) * E/ep)

The merge needs nothing about pipeline schedules (1F1B, DualPipe's replicated pairs, DualPipeV's
two pieces per rank): every tensor name found in any rank file is either a routed-expert tensor,
concatenated over ep_rank along dim 0, or anything else, taken from any rank that has it. Every
copy of a tensor (data-parallel and DualPipe replicas, the MTP embedding copy) must be equal to
the others bit for bit; a difference is reported, not averaged.

Checkpoints older than the "model" entry of meta.json fall back to the run folder's resolved
config, `<step folder>/../../config.yaml` (its `model:` and `parallel:` sections).

This module reads the files itself (json, torch.load) instead of importing megads.train:
imports point down (train -> parallel -> model), and convert sits beside train.
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megads.convert.hf import CheckpointError
from megads.convert.native import config_from_json
from megads.model.config import ModelConfig
from megads.model.moe import MoE
from megads.model.transformer import DeepseekV3

FORMAT_VERSION = 1  # megads.train.checkpoint.FORMAT_VERSION
META_FILE = "meta.json"
FULL_MODEL_FILE = "model.pt"
RUN_CONFIG = Path("..") / ".." / "config.yaml"  # relative to the step folder
EXPERT_SHARD_DIM = 0  # shard_experts slices w[lo : lo + E/ep]


def rank_model_file(rank: int) -> str:
    return f"model_rank_{rank:05d}.pt"


@dataclass(frozen=True)
class StateLayout:
    """The part of the parallel layout that decides which rank file holds which tensor."""

    world_size: int
    pp: int
    ep: int

    @property
    def dp(self) -> int:
        return self.world_size // self.pp

    def ep_rank(self, rank: int) -> int:
        """Expert-parallel index of `rank` (rank = pp_rank * dp + dp_rank, dp_rank = edp_rank * ep + ep_rank)."""
        return (rank % self.dp) % self.ep


def is_trainer_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a folder that looks like a trainer step folder (meta.json or a rank model file)."""
    src = Path(path)
    return (src / META_FILE).is_file() or (src / FULL_MODEL_FILE).is_file() or any(src.glob("model_rank_*.pt"))


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """meta.json of a completed step folder; CheckpointError for anything else."""
    src = Path(path)
    meta_path = src / META_FILE
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a folder; point at a trainer step folder (<run>/checkpoints/step_XXXXXXXX)")
    if not meta_path.is_file():
        why = ("an interrupted save (the .tmp suffix)" if src.name.endswith(".tmp")
               else "no meta.json, which the trainer writes last")
        raise CheckpointError(f"{src}: not a completed checkpoint ({why}); use a completed step_XXXXXXXX folder")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format {meta.get('format')!r}, this megads reads {FORMAT_VERSION}"
        )
    if not isinstance(meta.get("world_size"), int) or meta["world_size"] < 1:
        raise CheckpointError(f"{meta_path}: no valid world_size ({meta.get('world_size')!r})")
    return meta


def _run_config_section(step_dir: Path, section: str, *, why: str) -> dict[str, Any]:
    """`section` of the run folder's resolved config.yaml (for checkpoints whose meta.json lacks it)."""
    cfg_file = (step_dir / RUN_CONFIG).resolve()
    if not cfg_file.is_file():
        raise CheckpointError(
            f"{step_dir / META_FILE} records no {why} (a checkpoint from before meta.json carried it) and "
            f"{cfg_file} (the run folder's resolved config) does not exist; copy the run's config.yaml there"
        )
    import yaml  # PyYAML, a dependency of omegaconf / hydra

    try:
        raw = yaml.safe_load(cfg_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable run config ({e})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get(section), dict):
        raise CheckpointError(f"{cfg_file}: no `{section}:` section (needed for the {why} of {step_dir})")
    return raw[section]


def checkpoint_model_config(step_dir: Path, meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of a checkpoint: meta.json's "model", else the run folder's config.yaml."""
    if "model" in meta:
        raw, source = meta["model"], f'{step_dir / META_FILE} ("model")'
    else:
        raw, source = _run_config_section(step_dir, "model", why="model config"), str((step_dir / RUN_CONFIG).resolve())
    try:
        return config_from_json(json.dumps(raw), source=source)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a valid model config ({e})") from None


def checkpoint_layout(step_dir: Path, meta: dict[str, Any]) -> StateLayout:
    """pp and ep of a per-rank checkpoint: meta.json's "layout", else the run folder's config.yaml."""
    world = meta["world_size"]
    if "layout" in meta:
        raw, source = meta["layout"], f'{step_dir / META_FILE} ("layout")'
    else:
        raw = _run_config_section(step_dir, "parallel", why="parallel layout")
        source = str((step_dir / RUN_CONFIG).resolve())
    pp, ep = raw.get("pp"), raw.get("ep")
    if not (isinstance(pp, int) and isinstance(ep, int) and pp >= 1 and ep >= 1 and world % pp == 0
            and (world // pp) % ep == 0):
        raise CheckpointError(
            f"{source}: pp={pp!r}, ep={ep!r} do not fit world_size={world} (world = pp x dp, ep divides dp)"
        )
    layout = StateLayout(world_size=world, pp=pp, ep=ep)
    if raw.get("dp", layout.dp) != layout.dp:
        raise CheckpointError(f"{source}: dp={raw['dp']} but world_size / pp = {layout.dp}")
    return layout


def _load_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{file}: unreadable model state ({e})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a model state_dict (name -> tensor)")
    return state


def expert_tensor_names(model: DeepseekV3) -> set[str]:
    """Names of the routed-expert parameters, the tensors expert parallel shards (as shard_experts names them)."""
    return {f"{mod_name}.experts.{n}" for mod_name, mod in model.named_modules() if isinstance(mod, MoE)
            for n, _ in mod.experts.named_parameters()}


def merge_rank_states(
    files: Sequence[Path], *, layout: StateLayout, expert_names: set[str], num_experts: int
) -> dict[str, torch.Tensor]:
    """One full state_dict from the per-rank files (`files[rank]`), see the module docstring."""
    per_rank = num_experts // layout.ep
    merged: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}  # the file a dense tensor (or one expert slice) was taken from
    slices: dict[str, dict[int, torch.Tensor]] = {}
    for rank, file in enumerate(files):
        ep_rank = layout.ep_rank(rank)
        for name, t in _load_state(file).items():
            if name in expert_names:
                if t.shape[EXPERT_SHARD_DIM] != per_rank:
                    raise CheckpointError(
                        f"{file}: {name} holds {t.shape[EXPERT_SHARD_DIM]} experts along dim {EXPERT_SHARD_DIM}, "
                        f"expected n_routed_experts / ep = {num_experts} / {layout.ep} = {per_rank}"
                    )
                key, have = f"{name}[ep_rank {ep_rank}]", slices.setdefault(name, {})
                first = have.setdefault(ep_rank, t)
            else:
                key, first = name, merged.setdefault(name, t)
            source.setdefault(key, file)
            if first is not t and not (first.shape == t.shape and torch.equal(first, t)):
                raise CheckpointError(
                    f"{file}: copy of {key} differs from the one in {source[key]} "
                    f"(shapes {tuple(t.shape)} and {tuple(first.shape)}); the replicas of a checkpoint must agree"
                )
    for name, have in slices.items():
        absent = sorted(set(range(layout.ep)) - set(have))
        if absent:
            raise CheckpointError(
                f"{files[0].parent}: no rank file holds the experts of ep_rank {absent} for {name} (ep={layout.ep})"
            )
        merged[name] = torch.cat([have[r] for r in range(layout.ep)], dim=EXPERT_SHARD_DIM)
    return merged


def read_model_state(
    step_dir: Path, meta: dict[str, Any], *, model: DeepseekV3
) -> tuple[dict[str, torch.Tensor], str]:
    """(full single-process state_dict, where it came from) of a step folder; `model` gives the names."""
    full = step_dir / FULL_MODEL_FILE
    if full.is_file():
        return _load_state(full), str(full)
    world = meta["world_size"]
    files = [step_dir / rank_model_file(r) for r in range(world)]
    missing = [f.name for f in files if not f.is_file()]
    if len(missing) == world:
        raise CheckpointError(
            f"{step_dir}: holds neither {FULL_MODEL_FILE} nor {rank_model_file(0)}, ...; not a model checkpoint"
        )
    if missing:
        raise CheckpointError(f"{step_dir}: missing rank files {missing} (meta.json says {world} ranks wrote it)")
    layout = checkpoint_layout(step_dir, meta)
    num_experts = model.cfg.n_routed_experts
    if num_experts % layout.ep:
        raise CheckpointError(f"{step_dir}: n_routed_experts={num_experts} is not divisible by ep={layout.ep}")
    state = merge_rank_states(files, layout=layout, expert_names=expert_tensor_names(model), num_experts=num_experts)
    return state, str(step_dir / "model_rank_*.pt")


def load_model_from_checkpoint(path: str | os.PathLike[str]) -> DeepseekV3:
    """The float32 single-process DeepseekV3 of a trainer step folder (any parallel layout).

    Raises CheckpointError naming the path and what is wrong: not a completed checkpoint, no model
    config, missing rank files, replicas that disagree, unknown / missing tensors, shape mismatch.
    """
    step_dir = Path(path)
    meta = read_meta(step_dir)
    model = DeepseekV3(checkpoint_model_config(step_dir, meta))
    state, source = read_model_state(step_dir, meta, model=model)
    expected = model.state_dict()
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        raise CheckpointError(
            f"{source}: does not match the model config: unknown tensors {unknown[:5]}, missing tensors {missing[:5]}"
        )
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(t.shape)}, "
                f"the model config gives {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    return model.to(torch.float32)
