"""A tiny built-in text source: byte-level tokens of the Python standard library sources.

Used when the data pipeline (`data/`) is unavailable (`data=fallback`). Every byte is a token
(0..255) and 256 ends each file, so `vocab_size` is 257 and any model vocabulary >= 257 fits.
The files are read in sorted order up to `max_bytes`, concatenated with EOS, and cut into
windows of seq_len + 1 tokens (inputs = window[:-1], labels = window[1:]). Each epoch shuffles
the windows with a seeded permutation; rank r takes every dp_size-th window, all ranks the
same number, so ranks never overlap. The loader state is (epoch, cursor): a loader restored
from `state_dict()` yields exactly the batches the original would have.

Shapes: W windows, T sequence length, B micro-batch size.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

EOS = 256


@dataclass
class FallbackDataConfig:
    kind: str = "fallback"  # marks this source; the built-in pipeline's config has no `kind`
    root: str | None = None  # folder of .py files; None = the running interpreter's stdlib
    max_bytes: int = 4_000_000
    seed: int = 1234

    def validate(self) -> None:
        if self.kind != "fallback":
            raise ValueError(f"data.kind={self.kind!r}: the fallback source needs kind=fallback")
        if self.max_bytes < 1024:
            raise ValueError(f"data.max_bytes={self.max_bytes} must be >= 1024")
        if self.root is not None and not Path(self.root).is_dir():
            raise ValueError(f"data.root={self.root!r} is not a folder; point it at a folder of .py files or null")


def read_corpus(cfg: FallbackDataConfig) -> torch.Tensor:
    root = Path(cfg.root) if cfg.root is not None else Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        if not raw.strip():
            continue
        chunks.append(raw)
        total += len(raw) + 1
        if total >= cfg.max_bytes:
            break
    if total == 0:
        raise ValueError(f"data.root={str(root)!r} holds no non-empty .py file")
    out = torch.empty(total, dtype=torch.int16)
    pos = 0
    for raw in chunks:
        n = len(raw)
        out[pos : pos + n] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int16)
        out[pos + n] = EOS
        pos += n + 1
    return out[: cfg.max_bytes]


class ByteLoader:
    """Iterator of {"input_ids": [B, T], "labels": [B, T]} int64 micro-batches for one rank."""

    vocab_size = 257
    eos_token_id = EOS

    def __init__(
        self, cfg: FallbackDataConfig, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        self.cfg = cfg
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.tokens = read_corpus(cfg)
        self.n_windows = (self.tokens.numel() - 1) // seq_len
        self.per_rank = self.n_windows // dp_size
        if self.per_rank < micro_batch_size:
            raise ValueError(
                f"data.max_bytes={cfg.max_bytes} gives {self.n_windows} windows of seq_len={seq_len}, fewer than "
                f"micro_batch_size={micro_batch_size} per rank for {dp_size} ranks; raise data.max_bytes"
            )
        self.epoch = 0
        self.cursor = 0
        self._order = self._rank_order(0)

    def _rank_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        perm_W = torch.randperm(self.n_windows, generator=g)
        return perm_W[self.dp_rank :: self.dp_size][: self.per_rank]

    def __iter__(self) -> ByteLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.cursor + self.micro_batch_size > self.per_rank:
            self.epoch += 1
            self.cursor = 0
            self._order = self._rank_order(self.epoch)
        idx_B = self._order[self.cursor : self.cursor + self.micro_batch_size]
        self.cursor += self.micro_batch_size
        offsets_BT = idx_B[:, None] * self.seq_len + torch.arange(self.seq_len + 1)  # [B, T+1]
        window_BT = self.tokens[offsets_BT].long()
        return {"input_ids": window_BT[:, :-1], "labels": window_BT[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "dp_rank": self.dp_rank, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["dp_rank"], state["dp_size"]) != (self.dp_rank, self.dp_size):
            raise ValueError(
                f"fallback data state was saved by rank {state['dp_rank']} of {state['dp_size']}, loaded by "
                f"rank {self.dp_rank} of {self.dp_size}; resume with the same number of ranks"
            )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self._order = self._rank_order(self.epoch)


def build_fallback_loader(
    cfg: FallbackDataConfig, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> ByteLoader:
    return ByteLoader(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
