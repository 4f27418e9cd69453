"""Step folders on torch.distributed.checkpoint (DCP): sharded save/load, manifest, completion marker.

A step folder (format 2) holds

    .metadata, __<r>_<i>.distcp   DCP's own files: one global index, one data file per writing rank
    manifest.json                 every DCP file's size in bytes and SHA-256
    meta.json                     the completion marker, written last (step, tokens, model config,
                                  layout, ...); a folder without it never counts

`save_state` writes a flat state dict {key: value} where a value is

    a torch.Tensor    replicated: every rank holding it offers it, DCP writes it once
    a ShardView       this rank's box of a global tensor (routed experts: [E/ep, ...] rows of the
                      global [E, ...] tensor; ZeRO-1 moments: a 1-D range of the flattened
                      parameter); the boxes of all ranks must tile the global tensor
    anything else     a picklable object (replicated the same way, by key)

`load_state` fills a state dict of the same kinds from any folder whose global tensors contain
the requested boxes: a rank asks for the keys and boxes of *its* layout, DCP reads the
overlapping pieces of whatever boxes were saved. That is the whole resharding mechanism.

Why ShardView and not DTensor: ZeRO-1 shards are arbitrary element ranges of a parameter (bucket
boundaries, padding), which no DTensor placement describes; DCP's planner accepts any object
that says which box of which global tensor it is (`__create_write_items__`,
`__create_chunk_list__`, `__get_tensor_shard__`, the protocol DTensor implements).

Atomicity: ranks write into `<step>.tmp`; after DCP's own commit (its `.metadata`), every rank
hashes a share of the files, rank 0 writes manifest.json, then meta.json, then renames the
folder (one `os.replace`). An interrupted save leaves a `.tmp` folder that is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.utils import find_state_dict_object

FORMAT_VERSION = 2
MODEL_PREFIX = "model."  # model.<name of the single-process state_dict> (routed experts: global [E, ...])
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
_HASH_BLOCK = 8 << 20


class CheckpointCorrupt(ValueError):
    """A step folder that is incomplete, truncated or altered; the message names the file."""


@dataclass
class ShardView:
    """This rank's box of a global tensor: `local` sits at `offsets` inside `global_shape`."""

    local: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.offsets) != len(self.global_shape) or self.local.dim() != len(self.global_shape):
            raise ValueError(f"ShardView: local {tuple(self.local.shape)} at {self.offsets} in {self.global_shape}")
        for o, n, g in zip(self.offsets, self.local.shape, self.global_shape):
            if o < 0 or o + n > g:
                raise ValueError(f"ShardView: box {self.offsets}+{tuple(self.local.shape)} outside {self.global_shape}")

    def size(self) -> torch.Size:  # what DCP's load plan compares with the saved size
        return torch.Size(self.global_shape)

    def _chunk(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.size())

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(
            index=MetadataIndex(fqn, torch.Size(self.offsets)), type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=self._chunk(), properties=TensorProperties(dtype=self.local.dtype),
                                        size=torch.Size(self.global_shape)),
        )]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [self._chunk()]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local


def _lookup(state: Mapping[str, Any], index: MetadataIndex) -> Any:
    obj = state.get(index.fqn)
    if isinstance(obj, ShardView):
        return obj.local
    return find_state_dict_object(state, index)  # type: ignore[arg-type]


class ShardSavePlanner(DefaultSavePlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex) -> Any:
        return _lookup(self.state_dict, index)


class ShardLoadPlanner(DefaultLoadPlanner):
    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, allow_partial_load=False)

    def set_up_planner(self, state_dict: Any, metadata: Any = None, is_coordinator: bool = False) -> None:
        # DefaultLoadPlanner's set-up walks the state dict to materialise meta tensors and, doing
        # so, replaces every object it does not know (a ShardView) with None; nothing here is meta
        self.original_state_dict = self.state_dict = state_dict
        self.metadata = metadata
        self.is_coordinator = is_coordinator

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return _lookup(self.state_dict, index)


def collective_device(group: Any = None) -> torch.device:
    """Where a tensor for a collective over `group` must live: NCCL takes CUDA tensors only."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def save_state(folder: str | os.PathLike[str], state: dict[str, Any], *, group: Any = None) -> None:
    """Collective over `group` (None: the default group, or one process without any)."""
    writer = FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True, thread_count=1)
    dcp.save(state, storage_writer=writer, planner=ShardSavePlanner(), process_group=group,
             no_dist=not dist.is_initialized())


def load_state(folder: str | os.PathLike[str], state: dict[str, Any], *, group: Any = None) -> None:
    """Fill `state` in place (tensors and ShardView boxes copied into, objects replaced).

    ValueError naming the folder and the keys when it lacks some of them (another model, or a
    weights-only folder where training state is asked for); every rank checks its own keys.
    """
    reader = FileSystemReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    missing = sorted(set(state) - set(saved))
    if dist.is_initialized():  # agreed first: a rank that stopped alone would leave the others in DCP's collectives
        failed = torch.tensor([1 if missing else 0], device=collective_device(group))
        dist.all_reduce(failed, group=group)
        if int(failed) and not missing:
            raise ValueError(f"{folder}: the checkpoint lacks keys other ranks need (their error names them)")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{folder}: the checkpoint holds no {', '.join(missing[:5])}{more}: it was written for another model "
            "(or holds weights only: use checkpoint.init_from for those)"
        )
    dcp.load(state, storage_reader=reader, planner=ShardLoadPlanner(), process_group=group,
             no_dist=not dist.is_initialized())


def saved_keys(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """key -> DCP storage metadata (TensorStorageMetadata: .size, .properties.dtype; or bytes)."""
    return dict(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def read_tensors(folder: str | os.PathLike[str], *, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """Every saved tensor whose key starts with `prefix`, whole, in one process (tests, small
    models; megads-convert streams instead). Keys are returned without the prefix."""
    meta = saved_keys(folder)
    state: dict[str, Any] = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in meta.items() if k.startswith(prefix) and hasattr(md, "size")
    }
    load_state(folder, state)
    return {k[len(prefix):]: v for k, v in state.items()}


def staged_copy(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `state` on the CPU that training may not change under an asynchronous save."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, ShardView):
            out[k] = ShardView(v.local.detach().to("cpu", copy=True), v.global_shape, v.offsets)
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().to("cpu", copy=True)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------- folder commit
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


# Checksumming a big checkpoint takes minutes (about 1 GB/s per rank): a progress bar on stderr
# from this many bytes of files on, none for the small folders of tests and tiny runs.
PROGRESS_MIN_BYTES = 2 * 2**30


def _bytes_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, file=sys.stderr,
                disable=total < PROGRESS_MIN_BYTES, leave=False)


def _hash_files(files: list[Path], *, desc: str) -> dict[str, dict[str, Any]]:
    """{name: {bytes, sha256}} of `files`, with a progress bar when they are big."""
    sizes = {p: p.stat().st_size for p in files}
    out: dict[str, dict[str, Any]] = {}
    with _bytes_bar(sum(sizes.values()), desc) as bar:
        for path, n in sizes.items():
            out[path.name] = {"bytes": n, "sha256": _sha256(path)}
            bar.update(n)
    return out


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name not in (META_FILE, MANIFEST_FILE)
                  and not p.name.endswith(".tmp"))


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _group_rank_size(group: Any) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def commit_folder(tmp: Path, final: Path, *, meta: dict[str, Any], group: Any = None) -> None:
    """Collective: hash the DCP files (each rank a share), write manifest + meta.json, rename.

    Rank 0 of `group` writes; every rank returns after the rename.
    """
    rank, size = _group_rank_size(group)
    files = _data_files(tmp)
    mine = _hash_files(files[rank::size], desc=f"checksums of {final.name} (rank {rank})")
    parts: list[Any] = [None] * size
    if size > 1:
        dist.all_gather_object(parts, mine, group=group)
    else:
        parts = [mine]
    failure: list[str | None] = [None]
    if rank == 0:
        try:
            manifest = {"format": FORMAT_VERSION, "files": {k: v for part in parts for k, v in sorted(part.items())}}
            _write_json_atomic(tmp / MANIFEST_FILE, manifest)
            meta = {"format": FORMAT_VERSION, "bytes": sum(v["bytes"] for v in manifest["files"].values()), **meta}
            _write_json_atomic(tmp / META_FILE, meta)  # the completion marker
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:  # every rank learns it (instead of the others waiting in a barrier)
            failure[0] = f"{type(e).__name__}: {e}"
    if size > 1:
        dist.broadcast_object_list(failure, src=dist.get_global_rank(group, 0) if group is not None else 0,
                                   group=group)
    if failure[0] is not None:
        raise OSError(f"committing {final.name} failed on its rank 0: {failure[0]}")


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointCorrupt(f"{path}: missing; {folder} is not a completed checkpoint (an interrupted save?)")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointCorrupt(f"{path}: unreadable ({e})") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointCorrupt(
            f"{path}: checkpoint format {meta.get('format')!r}, this megads reads format {FORMAT_VERSION} "
            "(torch.distributed.checkpoint step folders); format 1 (torch.save per rank) is no longer read: "
            "start a new run_dir, or export its weights with the megads version that wrote it"
        )
    return meta


def verify_folder(folder: str | os.PathLike[str], *, checksums: bool = True) -> dict[str, Any]:
    """meta.json of a complete, intact step folder; CheckpointCorrupt naming the first bad file."""
    folder = Path(folder)
    meta = read_meta(folder)
    mpath = folder / MANIFEST_FILE
    try:
        files = json.loads(mpath.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointCorrupt(f"{mpath}: missing or unreadable ({e})") from e
    for name, entry in files.items():
        p = folder / name
        if not p.is_file():
            raise CheckpointCorrupt(f"{p}: listed in {MANIFEST_FILE} but missing")
        n = p.stat().st_size
        if n != entry["bytes"]:
            raise CheckpointCorrupt(f"{p}: {n} bytes, the manifest says {entry['bytes']} (truncated?)")
    if checksums:
        with _bytes_bar(sum(int(e["bytes"]) for e in files.values()), f"verifying {folder.name}") as bar:
            for name, entry in files.items():
                if _sha256(folder / name) != entry["sha256"]:
                    raise CheckpointCorrupt(f"{folder / name}: SHA-256 differs from {MANIFEST_FILE} (the file was "
                                            "altered or is corrupt)")
                bar.update(int(entry["bytes"]))
    if ".metadata" not in files:
        raise CheckpointCorrupt(f"{mpath}: lists no DCP .metadata file")
    return meta


# ---------------------------------------------------------------------------------- step folders
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_folders(ckpt_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named step_XXXXXXXX, by step number."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    return sorted((int(c.name[5:]), c) for c in root.iterdir()
                  if c.name.startswith("step_") and c.name[5:].isdigit() and len(c.name) == 13 and c.is_dir())


def completed_steps(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Step folders with a completion marker, oldest first (by step number)."""
    return [p for _, p in _step_folders(ckpt_dir) if (p / META_FILE).is_file()]


def unmarked_step_folders(ckpt_dir: str | os.PathLike[str]) -> list[Path]:
    """Folders named like a step but without the completion marker: never a save's own output
    (the marker is written before the rename), so another tool's folder or a damaged one."""
    return [p for _, p in _step_folders(ckpt_dir) if not (p / META_FILE).is_file()]


def newest_first(ckpt_dir: str | os.PathLike[str]) -> Iterator[Path]:
    yield from reversed(completed_steps(ckpt_dir))
