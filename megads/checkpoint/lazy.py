"""DCP folders written and read one tensor at a time, in one process (checkpoint conversion).

    save_lazy(folder, {key: LazyTensor | tensor | object})   the tensors come into being one by
                                                             one, as DCP writes them
    CheckpointReader(folder).read_box(key, offsets, sizes)   one box of a saved global tensor

Lazy save. A `LazyTensor` tells DCP's planner a global tensor's size, dtype and the boxes
(chunks) it is stored in (`__create_write_items__`, the protocol `ShardView` and DTensor
implement) without holding any data; DCP's FileSystemWriter asks the planner for each write
item's data (`resolve_data`) only when it is about to write it, and `produce(offsets, sizes)`
makes it then. With thread_count=1 and no copy-ahead (`per_thread_copy_ahead=0`, which also
keeps the GPU loader that resolves items ahead out of the way) the writer resolves the items
one after the other, each written before the next is asked for. The writer keeps a reference
to every tensor it wrote until its file is done (torch 2.11-2.13 `_write_files_from_queue`
collects them for its safetensors mode), so the planner frees each produced tensor's memory
(`untyped_storage().resize_(0)`) when the next one is asked for: at most one produced tensor
is alive at a time. A tensor a producer returns is handed over: it must be fresh (not a view
of memory the producer keeps).

A global tensor may be stored in several chunks (`chunks`): the metadata still describes one
tensor of `size`, and a reader of any box reads the overlapping chunks, exactly as for a tensor
several ranks saved their boxes of. Conversion writes routed experts one chunk per expert.

Reading. DCP's FileSystemReader reads a whole saved chunk (torch.load) and copies the requested
box out of it, so a box costs its chunk's bytes: `row_ranges` gives the dim-0 ranges that read
each chunk exactly once. `CheckpointReader` parses the folder's `.metadata` once for all reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megads.checkpoint.dcp import ShardLoadPlanner, ShardView

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


@dataclass
class LazyTensor:
    """A global tensor of `size` and `dtype` whose boxes `produce(offsets, sizes)` makes on demand.

    `chunks`: the boxes it is stored in (they must tile it); None: one box, the whole tensor.
    """

    size: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[tuple[int, ...], tuple[int, ...]], torch.Tensor]
    chunks: list[Box] | None = None

    def boxes(self) -> list[Box]:
        return self.chunks if self.chunks is not None else [((0,) * len(self.size), tuple(self.size))]

    @property
    def nbytes(self) -> int:
        return math.prod(self.size) * self.dtype.itemsize

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)), type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=self.dtype), size=torch.Size(self.size),
                ),
            )
            for offsets, sizes in self.boxes()
        ]


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, on_write: Callable[[int], None] | None) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._on_write = on_write
        self._last: torch.Tensor | None = None

    def release(self) -> None:
        """Free the memory of the tensor handed out last (the writer has written it)."""
        if self._last is not None:
            self._last.untyped_storage().resize_(0)
            self._last = None

    def resolve_data(self, write_item: WriteItem) -> Any:
        self.release()
        obj = self.state_dict.get(write_item.index.fqn)
        if not isinstance(obj, LazyTensor):
            return super().resolve_data(write_item)
        assert write_item.tensor_data is not None
        chunk = write_item.tensor_data.chunk
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        t = obj.produce(offsets, sizes).detach()
        if tuple(t.shape) != sizes or t.dtype != obj.dtype:
            raise AssertionError(f"{write_item.index.fqn} at {offsets}: produced {t.dtype}{list(t.shape)}, "
                                 f"declared {obj.dtype}{list(sizes)}")
        storage = t.untyped_storage()
        if (t.device.type != "cpu" or not t.is_contiguous() or t.storage_offset() or storage.nbytes() != t.nbytes
                or not storage.resizable()):
            t = t.to("cpu").clone(memory_format=torch.contiguous_format)  # compact and ours to free
        self._last = t
        if self._on_write is not None:
            self._on_write(t.nbytes)
        return t


def save_lazy(
    folder: str | os.PathLike[str], state: dict[str, Any], *, on_write: Callable[[int], None] | None = None
) -> None:
    """Write `state` ({key: LazyTensor | tensor | picklable object}) as a DCP folder, in this
    process alone; `on_write(nbytes)` after each produced tensor (a progress bar)."""
    writer = FileSystemWriter(str(folder), single_file_per_rank=True, sync_files=True, thread_count=1,
                              per_thread_copy_ahead=0)
    planner = _LazySavePlanner(on_write)
    try:
        dcp.save(state, storage_writer=writer, planner=planner, no_dist=True)
    finally:
        planner.release()


class _CachedReader(FileSystemReader):
    """FileSystemReader that unpickles `.metadata` once, not once per load."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class CheckpointReader:
    """Boxes of the global tensors of one DCP folder, read in this process."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._reader = _CachedReader(str(folder))
        self.entries: dict[str, Any] = dict(self._reader.read_metadata().state_dict_metadata)

    def tensor(self, key: str) -> TensorStorageMetadata:
        md = self.entries[key]
        if not isinstance(md, TensorStorageMetadata):
            raise KeyError(f"{key} is not a tensor in {self.folder}")
        return md

    def row_ranges(self, key: str) -> list[tuple[int, int]]:
        """Dim-0 ranges that together cover the tensor and each lie inside the saved chunks' rows."""
        md = self.tensor(key)
        cuts = {0, md.size[0]}
        for c in md.chunks:
            cuts.update((c.offsets[0], c.offsets[0] + c.sizes[0]))
        edges = sorted(cuts)
        return list(zip(edges[:-1], edges[1:]))

    def read_box(self, key: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None,
                 ) -> torch.Tensor:
        """A new tensor (saved dtype) holding the box at `offsets` of `sizes` (None: the whole tensor)."""
        md = self.tensor(key)
        full = tuple(md.size)
        sizes = full if sizes is None else tuple(sizes)
        offsets = (0,) * len(full) if offsets is None else tuple(offsets)
        out = torch.empty(sizes, dtype=md.properties.dtype)
        value: Any = out if sizes == full else ShardView(out, full, offsets)
        self.read({key: value})
        return out

    def read(self, state: dict[str, Any]) -> None:
        """Fill `state` ({key: tensor | ShardView | None}) in place, as `megads.checkpoint.dcp.load_state`."""
        dcp.load(state, storage_reader=self._reader, planner=ShardLoadPlanner(), no_dist=True)
