"""megads checkpoint folders (torch.distributed.checkpoint, format 2) <-> Hugging Face folders, streaming.

A checkpoint folder is what the trainer writes for a step, or `convert_from_hf` for a HF model
(megads.checkpoint.dcp): DCP files + manifest.json + meta.json, the model under
`model.<single-process state_dict name>`, routed experts as one global [E, ...] tensor per layer
and projection. meta.json carries the model config ("model"); `convert_from_hf` writes
{"step": 0, "weights_only": true, "source": <HF folder>}; a trainer step also holds
`optim.*`, `loader`, `rng.*`, which conversion ignores.

    convert_from_hf(hf, dst)   HF -> checkpoint folder, one tensor at a time through
                               `megads.checkpoint.lazy.save_lazy`: each tensor is read from the
                               safetensors shards when DCP is about to write it, routed experts
                               one expert per chunk; peak memory is the largest non-expert tensor
                               (or one expert) plus the interpreter
    convert_to_hf(ckpt, hf)    checkpoint folder (verified first) -> HF folder through
                               `megads.convert.hf.write_hf_folder`, reading one tensor, or the
                               experts of one saved chunk, at a time; shards are written as their
                               tensors arrive; peak memory is about twice the largest saved chunk
                               (DCP loads a chunk, then copies the box out of it)
    load_model(ckpt)           the single-process DeepseekV3 of a checkpoint folder

Both keep the stored dtype (bf16 stays bf16: HF -> checkpoint -> HF is bit-identical); FP8 HF
weights (weight + weight_scale_inv) become float32 on import, and `to-hf --fp8` quantises again.
The format-1 folders (per-rank torch.save files) of earlier megads versions are refused with a
message (`megads.checkpoint.dcp.read_meta`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from megads.checkpoint.dcp import META_FILE, MODEL_PREFIX, commit_folder, load_state, read_meta, verify_folder
from megads.checkpoint.lazy import CheckpointReader, LazyTensor, save_lazy
from megads.convert.errors import CheckpointError
from megads.convert.hf import (
    HFCheckpoint,
    is_expert_tensor,
    model_shapes,
    read_hf_config,
    write_hf_folder,
)
from megads.convert.native import config_from_json
from megads.model.config import ModelConfig
from megads.model.init import init_parameters
from megads.model.linear import GroupedLinear
from megads.model.transformer import DeepseekV3


@contextmanager
def _one_process() -> Iterator[None]:
    """DCP warns on every call that it runs without a process group; here that is the point."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=not progress, mininterval=0.5)


# ---------------------------------------------------------------------------------- HF -> checkpoint
def _fresh_producer(meta_model: DeepseekV3, ours: str, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """Boxes of a freshly initialised tensor: the values `init_parameters` gives it in the whole
    model of seed `meta_model.init_seed` (routed experts: row e from its own generator)."""
    mod_name, _, attr = ours.rpartition(".")
    leaf = meta_model.get_submodule(mod_name)

    def produce(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        if isinstance(leaf, GroupedLinear):
            with torch.device("meta"):
                fresh: nn.Module = GroupedLinear(sizes[0], leaf.in_features, leaf.out_features)
            fresh.first_index = offsets[0]
        else:
            fresh = copy.deepcopy(leaf)
        fresh.to_empty(device="cpu")
        root = parent = nn.Module()  # the leaf at its own path, so its names (and seeds) are the model's
        *path, last = mod_name.split(".")
        for part in path:
            parent.add_module(part, nn.Module())
            parent = parent.get_submodule(part)
        parent.add_module(last, fresh)
        init_parameters(root, seed=meta_model.init_seed, std=meta_model.cfg.initializer_range)
        return getattr(fresh, attr).detach().to(dtype).clone()

    return produce


def _hf_producer(ckpt: HFCheckpoint, ours: str, dtype: torch.dtype, *, expert: bool) -> Callable[..., torch.Tensor]:
    def produce(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        out = torch.empty(sizes, dtype=dtype)
        ckpt.fill(ours, out, experts=(offsets[0], offsets[0] + sizes[0]) if expert else None)
        return out

    return produce


def _staging(dst: Path, *, overwrite: bool) -> Path:
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a folder")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst}: exists; pass --overwrite (overwrite=True) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))


def convert_from_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    init_missing_mtp: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Write the HF checkpoint folder `src` as a weights-only megads checkpoint folder `dst`
    (staged beside it, committed atomically); returns its meta.json.

    Everything is checked from the file headers before anything is written (unknown, missing,
    mis-shaped tensors raise CheckpointError naming file and tensor). `init_missing_mtp=True`
    accepts a checkpoint without MTP tensors and writes freshly initialised ones (seed recorded
    in meta.json as "mtp_init_seed").
    """
    src, dst = Path(src), Path(dst)
    cfg = read_hf_config(src)
    ckpt = HFCheckpoint(src, cfg)
    with torch.device("meta"):
        meta_model = DeepseekV3(cfg)  # names, shapes and module kinds; init_seed for fresh MTP tensors
    shapes = model_shapes(cfg)
    E = cfg.n_routed_experts
    missing = {ours: ckpt.missing(ours, (0, E) if is_expert_tensor(ours) else None) for ours in shapes}
    missing = {k: v for k, v in missing.items() if v}
    mtp = {k for k in shapes if k.startswith("mtp.")}
    fresh: set[str] = set()
    if missing:
        if init_missing_mtp and set(missing) <= mtp and not any(ckpt.pieces.get(k) for k in mtp):
            fresh = mtp
        else:
            names = [n for v in missing.values() for n in v]
            raise CheckpointError(
                f"{src}: {len(names)} tensors missing, e.g. {', '.join(names[:5])}"
                + (" (MTP layers: pass --init-missing-mtp to start them fresh)" if set(missing) & mtp else "")
            )
    if not fresh:
        ckpt.check_shared_copies()
    fresh_dtype = ckpt.stored_dtype("embed_tokens.weight")
    state: dict[str, Any] = {}
    for ours, shape in shapes.items():
        expert = is_expert_tensor(ours)
        dtype = fresh_dtype if ours in fresh else ckpt.stored_dtype(ours)
        chunks = [((e, *[0] * (len(shape) - 1)), (1, *shape[1:])) for e in range(shape[0])] if expert else None
        produce = (_fresh_producer(meta_model, ours, dtype) if ours in fresh
                   else _hf_producer(ckpt, ours, dtype, expert=expert))
        state[MODEL_PREFIX + ours] = LazyTensor(shape, dtype, produce, chunks)
    meta: dict[str, Any] = {"step": 0, "weights_only": True, "model": dataclasses.asdict(cfg),
                            "source": str(src.resolve())}
    if fresh:
        meta["mtp_init_seed"] = meta_model.init_seed
    tmp = _staging(dst, overwrite=overwrite)
    try:
        with _bar(sum(t.nbytes for t in state.values()), "from-hf", progress) as bar, _one_process():
            save_lazy(tmp, state, on_write=bar.update)
        commit_folder(tmp, dst, meta=meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return read_meta(dst)


# ---------------------------------------------------------------------------------- checkpoint -> HF
def _check_folder(src: Path) -> dict[str, Any]:
    """meta.json of an intact checkpoint folder (manifest sizes and SHA-256 checked)."""
    if not (src / META_FILE).is_file():
        hint = ""
        steps = sorted((p for p in [*src.glob("step_*"), *src.glob("checkpoints/step_*")] if (p / META_FILE).is_file()),
                       key=lambda p: p.name)
        if steps:
            hint = f"; a checkpoint is one step folder, e.g. {steps[-1]}"
        elif (src / "config.json").is_file():
            hint = "; it looks like a Hugging Face folder (config.json): that is what from-hf reads"
        elif src.name.endswith(".tmp"):
            hint = "; a .tmp folder is an interrupted save"
        raise CheckpointError(f"{src}: not a completed checkpoint folder (no {META_FILE}){hint}")
    return verify_folder(src)


def checkpoint_config(src: Path, meta: dict[str, Any]) -> ModelConfig:
    source = f'{src / META_FILE} ("model")'
    if "model" not in meta:
        raise CheckpointError(f"{src / META_FILE}: records no model config (\"model\"); not a megads model checkpoint")
    try:
        return config_from_json(json.dumps(meta["model"]), source=source)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not a valid model config ({e})") from None


def _model_entries(reader: CheckpointReader, cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Our name -> (shape, saved dtype), in model order; CheckpointError if the folder's model
    tensors are not exactly those of `cfg`."""
    shapes = model_shapes(cfg)
    saved = {k.removeprefix(MODEL_PREFIX): v for k, v in reader.entries.items() if k.startswith(MODEL_PREFIX)}
    unknown = sorted(set(saved) - set(shapes))
    missing = sorted(set(shapes) - set(saved))
    if unknown or missing:
        raise CheckpointError(
            f"{reader.folder}: its model tensors do not match its model config: unknown {unknown[:5]}, missing {missing[:5]}"
        )
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in shapes.items():
        md = saved[name]
        size = tuple(getattr(md, "size", ()))
        if not hasattr(md, "size") or size != shape:
            raise CheckpointError(
                f"{reader.folder}: {MODEL_PREFIX}{name} has shape {size if hasattr(md, 'size') else '(not a tensor)'}, "
                f"the model config gives {shape}"
            )
        out[name] = (shape, md.properties.dtype)
    return out


class CheckpointSource:
    """A checkpoint folder's model tensors as a `megads.convert.hf.ExportSource`."""

    def __init__(self, folder: Path, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._reader = CheckpointReader(folder)
        self._entries = _model_entries(self._reader, cfg)

    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(k, shape, dtype) for k, (shape, dtype) in self._entries.items()]

    def row_ranges(self, ours: str) -> list[tuple[int, int]]:
        return self._reader.row_ranges(MODEL_PREFIX + ours)  # each saved chunk read once

    def read(self, ours: str, rows: tuple[int, int] | None) -> torch.Tensor:
        shape = self._entries[ours][0]
        with _one_process():
            if rows is None:
                return self._reader.read_box(MODEL_PREFIX + ours)
            lo, hi = rows
            return self._reader.read_box(MODEL_PREFIX + ours, (lo, *[0] * (len(shape) - 1)), (hi - lo, *shape[1:]))


def convert_to_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    fp8: bool = False,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    progress: bool = False,
) -> ModelConfig:
    """Write the model of checkpoint folder `src` (a trainer step or `convert_from_hf` output)
    as a HF folder `dst`; returns its model config. A corrupt folder is refused before anything
    is written (CheckpointCorrupt naming the file)."""
    src = Path(src)
    if progress:
        print(f"megads-convert: verifying {src} (sizes and SHA-256 of every file)", file=sys.stderr)
    meta = _check_folder(src)
    cfg = checkpoint_config(src, meta)
    write_hf_folder(CheckpointSource(src, cfg), dst, max_shard_bytes=max_shard_bytes, fp8=fp8,
                    overwrite=overwrite, progress=progress)
    return cfg


def load_model(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> DeepseekV3:
    """The single-process DeepseekV3 (`dtype`) of a checkpoint folder, verified first."""
    src = Path(path)
    meta = _check_folder(src)
    cfg = checkpoint_config(src, meta)
    with _one_process():
        _model_entries(CheckpointReader(src), cfg)
    model = DeepseekV3(cfg).to(dtype)
    with _one_process():
        load_state(src, {MODEL_PREFIX + k: v for k, v in model.state_dict().items()})
    return model
