"""A tiny built-in text source: byte-level tokens of the Python standard library sources.

Used when the data pipeline (`data/`) is unavailable (`data=fallback`). Every byte is a token
(0..255) and 256 ends each file, so `vocab_size` is 257 and any model vocabulary >= 257 fits.
The files are read in sorted order up to `max_bytes`, concatenated with EOS, and cut into
W windows of seq_len + 1 tokens (window w = tokens [w*T, w*T + T + 1); inputs = window[:-1],
labels = window[1:]).

Order (the same rule as `megads.data.loader`): the global stream is the concatenation of epochs;
epoch e lists all W windows in the order of a permutation seeded by (seed, e), so global position
p is window perm_{p // W}[p % W]. The stream is cut into micro-steps of dp_size*B positions; in
micro-step s rank r takes positions s*dp_size*B + r*B + [0, B). Ranks are disjoint by
construction; a micro-step may straddle an epoch end (nothing is dropped or repeated).

The state is the number of global positions consumed after the last micro-batch handed out,
counted identically on every rank; it does not depend on dp_rank, dp_size or micro_batch_size,
so a loader restored from `state_dict()` after a full optimizer step, under any other layout,
continues the global stream with no window skipped or repeated.

Shapes: T sequence length, B micro-batch size.
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


STATE_VERSION = 2  # 1 (no "version" key) was the per-rank (epoch, cursor) state of older megads


class ByteLoader:
    """Iterator of {"input_ids": [B, T], "labels": [B, T]} int64 micro-batches for one rank."""

    vocab_size = 257
    eos_token_id = EOS

    def __init__(
        self, cfg: FallbackDataConfig, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len={seq_len}, micro_batch_size={micro_batch_size}: both must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        self.cfg = cfg
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.tokens = read_corpus(cfg)
        self.n_windows = (self.tokens.numel() - 1) // seq_len
        if self.n_windows < dp_size * micro_batch_size:
            raise ValueError(
                f"data.max_bytes={cfg.max_bytes} gives {self.n_windows} windows of seq_len={seq_len}, fewer than "
                f"micro_batch_size={micro_batch_size} per rank for {dp_size} ranks; raise data.max_bytes"
            )
        self.fingerprint = {"seed": cfg.seed, "seq_len": seq_len, "n_windows": self.n_windows}
        self.windows = 0  # global positions consumed (all ranks together), after the last batch handed out
        self._perms: dict[int, torch.Tensor] = {}  # epoch -> window order (the last two epochs used)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The window order of ``epoch`` (a seeded permutation of range(W))."""
        perm_W = self._perms.get(epoch)
        if perm_W is None:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            perm_W = torch.randperm(self.n_windows, generator=g)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = perm_W
        return perm_W

    def window_indices(self, start: int, n: int) -> torch.Tensor:
        """Windows at global positions [start, start + n) of the stream (across epoch ends)."""
        W = self.n_windows
        pos = torch.arange(start, start + n)
        out = torch.empty(n, dtype=torch.int64)
        for e in range(start // W, (start + n - 1) // W + 1):
            sel = (pos // W) == e
            out[sel] = self._epoch_order(e)[pos[sel] - e * W]
        return out

    def __iter__(self) -> ByteLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        B = self.micro_batch_size
        idx_B = self.window_indices(self.windows + self.dp_rank * B, B)
        self.windows += self.dp_size * B
        offsets_BT = idx_B[:, None] * self.seq_len + torch.arange(self.seq_len + 1)  # [B, T+1]
        window_BT = self.tokens[offsets_BT].long()
        return {"input_ids": window_BT[:, :-1], "labels": window_BT[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        """State after the last micro-batch handed out (same on every rank, for any layout)."""
        return {"version": STATE_VERSION, "windows": self.windows, "fingerprint": dict(self.fingerprint)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the global stream from ``state``; ``ValueError`` for another format or stream."""
        if state.get("version") != STATE_VERSION:
            what = "the per-rank (epoch, cursor) format of an older megads" if "cursor" in state else (
                f"format version {state.get('version')!r}")
            raise ValueError(
                f"fallback data state has {what}, not version {STATE_VERSION} (global windows consumed); its "
                "window order differs, so it cannot be continued without repeating or skipping windows; resume "
                "with the megads version that wrote it, or start the data stream afresh (a new run_dir)"
            )
        theirs = state.get("fingerprint", {})
        changed = sorted(k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k))
        if changed:
            raise ValueError(
                "fallback data state was saved for a different stream (changed: "
                + ", ".join(f"{k} {theirs.get(k)!r} -> {self.fingerprint.get(k)!r}" for k in changed)
                + "); resume with the same data.seed, data.max_bytes, data.root and seq_len, or start afresh"
            )
        windows = int(state["windows"])
        if windows < 0:
            raise ValueError(f"fallback data state is inconsistent (windows={windows} < 0)")
        self.windows = windows


def build_fallback_loader(
    cfg: FallbackDataConfig, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> ByteLoader:
    return ByteLoader(cfg, seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
