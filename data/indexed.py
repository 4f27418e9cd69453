"""Memory-mapped indexed token files: ``<prefix>.bin`` (tokens) and ``<prefix>.idx`` (index).

``.bin`` holds the tokens of all documents back to back (uint16 when the vocabulary fits, else
uint32), each document ending with EOS. ``.idx`` layout (little endian):

    magic   8s   b"MGDSIDX\\0"
    version u32  1
    itemsz  u32  2 or 4 (bytes per token in .bin)
    n_docs  u64
    n_tok   u64
    vocab   u64  tokenizer size (ids are < vocab)
    crc_off u32  crc32 of the offsets array
    crc_bin u32  crc32 of the whole .bin (checked by ``verify()``, not on every open)
    offsets u64[n_docs + 1]  token offset of each document start; offsets[-1] = n_tok

Opening checks magic, version, sizes of both files against the header, the offsets' crc and
monotonicity; any mismatch (truncation, a foreign or corrupted file) raises ``ValueError`` naming
the file and saying how to rebuild. The writer streams tokens to a temporary file and publishes
``.bin`` then ``.idx`` with ``os.replace``; the index is written last, so an interrupted run never
leaves a pair that opens as valid.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"MGDSIDX\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQII")
_REBUILD = "delete it (and its .bin/.idx partner) and rebuild with `python -m tools.prepare_data` or `tools.preprocess_data`"


def _with(prefix: Path, suffix: str) -> Path:
    return prefix.with_name(prefix.name + suffix)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


class IndexedWriter:
    """Append documents (token arrays) and publish the pair atomically with ``finalize``."""

    def __init__(self, prefix: str | Path, *, vocab_size: int) -> None:
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self._tmp_bin = self.prefix.with_name(f".{self.prefix.name}.bin.tmp-{os.getpid()}")
        self._fh = open(self._tmp_bin, "wb")
        self._lengths: list[np.ndarray] = []
        self._n_tokens = 0
        self._crc = 0

    def add(self, tokens: np.ndarray, *, lengths: np.ndarray) -> None:
        """Append documents: ``tokens`` concatenated, ``lengths`` (each >= 1) sums to its size."""
        assert int(lengths.sum()) == tokens.size and (lengths.size == 0 or lengths.min() >= 1)
        if tokens.size and (int(tokens.max()) >= self.vocab_size or int(tokens.min()) < 0):
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise ValueError(
                f"{_with(self.prefix, '.bin')}: token id {bad} is outside the vocabulary [0, {self.vocab_size}) "
                "(a tokenizer that does not match data.vocab_size?); nothing was published"
            )
        buf = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._fh.write(buf)
        self._crc = zlib.crc32(buf, self._crc)
        self._lengths.append(np.asarray(lengths, dtype=np.uint64))
        self._n_tokens += tokens.size

    def finalize(self) -> tuple[int, int]:
        """Publish ``.bin`` and ``.idx``; returns (documents, tokens)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.uint64)
        offsets = np.zeros(lengths.size + 1, dtype=np.uint64)
        np.cumsum(lengths, out=offsets[1:])
        off_bytes = offsets.tobytes()
        header = _HEADER.pack(
            MAGIC, VERSION, self.dtype.itemsize, lengths.size, self._n_tokens, self.vocab_size,
            zlib.crc32(off_bytes), self._crc,
        )
        tmp_idx = self.prefix.with_name(f".{self.prefix.name}.idx.tmp-{os.getpid()}")
        with open(tmp_idx, "wb") as f:
            f.write(header + off_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._tmp_bin, _with(self.prefix, ".bin"))
        os.replace(tmp_idx, _with(self.prefix, ".idx"))
        return int(lengths.size), self._n_tokens

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp_bin.unlink(missing_ok=True)


class IndexedTokens:
    """Read-only view: ``tokens`` (memmap), ``offsets`` (int64[n_docs+1]), ``doc_lengths``."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        idx, bin_ = _with(self.prefix, ".idx"), _with(self.prefix, ".bin")
        for p in (idx, bin_):
            if not p.is_file():
                raise ValueError(f"{p}: missing; {_REBUILD}")
        raw = idx.read_bytes()
        if len(raw) < _HEADER.size:
            raise ValueError(f"{idx}: truncated index ({len(raw)} bytes, header alone is {_HEADER.size}); {_REBUILD}")
        magic, version, itemsize, n_docs, n_tok, vocab, crc_off, crc_bin = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ValueError(f"{idx}: not a megads index (bad magic {magic!r}); {_REBUILD}")
        if version != VERSION:
            raise ValueError(f"{idx}: index version {version}, this code reads {VERSION}; {_REBUILD}")
        if itemsize not in (2, 4):
            raise ValueError(f"{idx}: corrupted header (token size {itemsize}); {_REBUILD}")
        expect = _HEADER.size + 8 * (n_docs + 1)
        if len(raw) != expect:
            raise ValueError(
                f"{idx}: {len(raw)} bytes but the header promises {expect} ({n_docs} documents): "
                f"truncated or corrupted; {_REBUILD}"
            )
        off_bytes = raw[_HEADER.size :]
        if zlib.crc32(off_bytes) != crc_off:
            raise ValueError(f"{idx}: document offsets fail their checksum (corrupted); {_REBUILD}")
        offsets = np.frombuffer(off_bytes, dtype=np.uint64).astype(np.int64)
        if offsets[0] != 0 or offsets[-1] != n_tok or (n_docs and np.any(np.diff(offsets) <= 0)):
            raise ValueError(f"{idx}: document offsets are inconsistent with the header; {_REBUILD}")
        size = bin_.stat().st_size
        if size != n_tok * itemsize:
            raise ValueError(
                f"{bin_}: {size} bytes but the index promises {n_tok} tokens x {itemsize} bytes "
                f"= {n_tok * itemsize}: truncated or from another build; {_REBUILD}"
            )
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        self.n_docs, self.n_tokens, self.vocab_size = int(n_docs), int(n_tok), int(vocab)
        self._crc_bin = crc_bin
        self.offsets = offsets
        self.doc_lengths = np.diff(offsets)
        self.tokens = (
            np.memmap(bin_, dtype=self.dtype, mode="r", shape=(n_tok,)) if n_tok else np.zeros(0, self.dtype)
        )

    def document(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def verify(self) -> None:
        """Full check of the token bytes against the index's crc32 (reads the whole file)."""
        crc = 0
        with open(_with(self.prefix, ".bin"), "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                crc = zlib.crc32(block, crc)
        if crc != self._crc_bin:
            raise ValueError(f"{_with(self.prefix, '.bin')}: token bytes fail their checksum; {_REBUILD}")
