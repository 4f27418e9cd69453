"""Streaming safetensors I/O: one tensor (or rows of one) read straight into memory we own, and
shard files written tensor by tensor under a header planned in advance.

    file = [8-byte little-endian header length N][N bytes JSON header][data]
    header = {name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}
    (offsets relative to the data; the tensors tile the data without gaps)

Why not `safetensors.safe_open` / `save_file` for the streaming converters: a tensor from
`safe_open(...).get_tensor` is a copy-on-write mapping of the file, resident (and counted in the
process's RSS) as long as any reference to it lives, and DCP's writer keeps a reference to every
tensor it wrote until the file is complete; `save_file` needs a whole shard in memory. Here a
read lands in a buffer the caller owns (`read_into`, no mapping, the page cache is not RSS) and
a shard is written as its tensors arrive (`ShardWriter`), so neither ever holds more than one
tensor. The files are the standard format: `safetensors` and `transformers` read what
`ShardWriter` writes, and `read_header` reads what they write (the tests check both ways).
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from megads.convert.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are: [start, end) of `file`."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0


def read_header(path: Path) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor in the safetensors file `path`."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}, not one of {sorted(DTYPES)}")
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
            raise CheckpointError(
                f"{path}: tensor {name} {entry['dtype']}{list(shape)} has bytes [{begin}, {end}) of a data section "
                f"of {size - base} bytes (truncated or corrupt file)"
            )
        out[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    return out


def _byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_into(info: TensorInfo, out: torch.Tensor, *, rows: tuple[int, int] | None = None) -> None:
    """Copy tensor `info` (or its dim-0 rows [lo, hi)) from the file into `out`: CPU, contiguous,
    the file's dtype, the tensor's shape (dim 0 cut to the rows)."""
    lo, hi = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
    shape = (hi - lo, *info.shape[1:]) if info.shape else ()
    if out.dtype != info.dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
        raise AssertionError(f"read_into {info.name}: {out.dtype}{list(out.shape)} for {info.dtype}{list(shape)}")
    if out.numel() == 0:
        return
    view = _byte_view(out)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.start + lo * info.row_bytes() if info.shape else info.start)
        while view.nbytes:
            n = f.readinto(view)
            if not n:
                raise CheckpointError(f"{info.file}: ends inside tensor {info.name} (truncated file)")
            view = view[n:]


def read(info: TensorInfo, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A new tensor holding `info` (or its dim-0 rows [lo, hi)), in the file's dtype."""
    lo, hi = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
    out = torch.empty((hi - lo, *info.shape[1:]) if info.shape else (), dtype=info.dtype)
    read_into(info, out, rows=rows)
    return out


@dataclass(frozen=True)
class Planned:
    """One tensor of a shard, known before its data exists."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class ShardWriter:
    """One safetensors file whose header is fixed up front; `write` the tensors in plan order."""

    def __init__(self, path: Path, planned: list[Planned], *, metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for p in planned:
            header[p.name] = {"dtype": DTYPE_NAMES[p.dtype], "shape": list(p.shape),
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as safetensors writes it
        self.path = path
        self._todo = deque(planned)
        self._f = path.open("wb")
        self._f.write(len(raw).to_bytes(8, "little"))
        self._f.write(raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        p = self._todo.popleft()
        if (p.name, p.dtype, p.shape) != (name, t.dtype, tuple(t.shape)):
            raise AssertionError(f"{self.path}: got {name} {t.dtype}{list(t.shape)}, planned {p}")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(_byte_view(t))

    @property
    def done(self) -> bool:
        return not self._todo

    def close(self) -> None:
        if self._todo:
            raise AssertionError(f"{self.path}: {len(self._todo)} planned tensors never written, e.g. {self._todo[0]}")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
