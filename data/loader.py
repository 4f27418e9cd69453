"""Packed, shuffled, blended, per-rank and resumable training batches from indexed token files.

Legend: S = window length = seq_len + 1, B = micro-batch size, L = seq_len.

Per source (one indexed token file of N tokens, every document already ending with EOS):
- the source's token stream is the concatenation of its epochs; epoch e lists the documents in
  the order of a permutation seeded by (seed, source, e);
- window k of the stream covers stream tokens [k*S, (k+1)*S) before shuffling; windows whose start
  lies in epoch e (k in [G_e, G_{e+1}), G_e = ceil(e*N/S)) are visited in the order of a seeded
  Feistel permutation of that range, an O(1)-memory bijection, so any window is found in O(log
  n_docs) without materialising a shuffle index. Windows tile the stream: within an epoch every
  token is used exactly once (the last window of an epoch runs on into the next one).

Blending: global window g goes to the source i maximising w_i*(g+1) - c_i (c_i = windows that
source has had so far; ties to the lower index), the deterministic schedule that keeps every
source within one window of its weight at every point.

Ranks and micro-batches: the global stream is cut into micro-steps of dp_size*B windows; in
micro-step s rank r takes windows s*dp_size*B + r*B + [0, B). Ranks are disjoint by construction.
The state is (windows consumed globally, windows consumed per source) after the last micro-batch
the caller received, identical on all ranks; a loader rebuilt from it (even with a different
dp_size or micro-batch size) continues exactly where the old one stopped. A background thread
prepares up to ``prefetch`` micro-batches ahead; the state only counts batches handed out.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from megads.data.config import DataConfig
from megads.data.indexed import IndexedTokens

STATE_VERSION = 1
_M64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """splitmix64 finaliser."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


class FeistelPermutation:
    """A seeded bijection of range(n) in O(1) memory (balanced Feistel network + cycle walking)."""

    def __init__(self, n: int, keys: tuple[int, ...]) -> None:
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.keys = keys

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        assert 0 <= i < self.n
        if self.n == 1:
            return 0
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: the domain is < 4n, so < 4 steps on average
            x = self._encrypt(x)
        return x


class SourceStream:
    """Windows of one source's shuffled, packed token stream (random access by window index)."""

    def __init__(self, tokens: IndexedTokens, *, seed: int, source_index: int, window: int) -> None:
        if tokens.n_tokens == 0:
            raise ValueError(
                f"{tokens.prefix}.bin holds no tokens (every document was skipped); "
                "check the preprocessing summary and the source"
            )
        self.data = tokens
        self._tokens = np.asarray(tokens.tokens)  # plain ndarray view of the memmap: cheaper slicing
        self.seed = seed
        self.source_index = source_index
        self.S = window
        self.N = tokens.n_tokens
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray, FeistelPermutation | None]] = OrderedDict()

    def _first_window(self, e: int) -> int:
        return -(-e * self.N // self.S)  # ceil(e*N/S)

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, FeistelPermutation | None]:
        """(document order, start of each ordered document in the epoch, window permutation)."""
        hit = self._epochs.get(e)
        if hit is not None:
            self._epochs.move_to_end(e)
            return hit
        rng = np.random.default_rng([self.seed, self.source_index, e])
        order = rng.permutation(self.data.n_docs)
        starts = np.zeros(self.data.n_docs + 1, dtype=np.int64)
        np.cumsum(self.data.doc_lengths[order], out=starts[1:])
        n_win = self._first_window(e + 1) - self._first_window(e)
        keys = tuple(int(k) for k in rng.integers(0, 2**63, size=4))
        perm = FeistelPermutation(n_win, keys) if n_win > 0 else None
        self._epochs[e] = (order, starts, perm)
        while len(self._epochs) > 4:
            self._epochs.popitem(last=False)
        return self._epochs[e]

    def window_start(self, k: int) -> int:
        """Stream position of the k-th window this source hands out."""
        e = k * self.S // self.N
        g0 = self._first_window(e)
        _, _, perm = self._epoch(e)
        assert perm is not None and g0 <= k < g0 + perm.n
        return (g0 + perm(k - g0)) * self.S

    def read(self, k: int, *, out_S: np.ndarray, starts_S: np.ndarray | None) -> None:
        """Copy window k into ``out_S``; mark document starts in ``starts_S`` when given."""
        pos = self.window_start(k)
        filled = 0
        tokens, offsets = self._tokens, self.data.offsets
        while filled < self.S:
            e, off = divmod(pos, self.N)
            order, starts, _ = self._epoch(e)
            d = int(np.searchsorted(starts, off, side="right")) - 1
            doc = int(order[d])
            in_doc = off - int(starts[d])
            take = min(int(starts[d + 1]) - off, self.S - filled)
            a = int(offsets[doc]) + in_doc
            out_S[filled : filled + take] = tokens[a : a + take]
            if starts_S is not None and in_doc == 0:
                starts_S[filled] = True
            filled += take
            pos += take


@dataclass
class LoaderState:
    windows: int  # global windows consumed (all ranks together)
    per_source: list[int]  # windows consumed from each source


def blend_schedule(weights: np.ndarray, *, state: LoaderState, n: int) -> tuple[list[int], list[int]]:
    """Source and per-source window index of the next ``n`` global windows (greedy schedule)."""
    counts = list(state.per_source)
    g = state.windows
    src_of, idx_of = [], []
    m = len(counts)
    for _ in range(n):
        g += 1
        if m == 1:
            best = 0
        else:
            best = max(range(m), key=lambda i: (weights[i] * g - counts[i], -i))
        src_of.append(best)
        idx_of.append(counts[best])
        counts[best] += 1
    return src_of, idx_of


class TrainLoader:
    """Iterator of this rank's micro-batches; see the module docstring for the stream layout.

    Yields ``{"input_ids": int64[B, L], "labels": int64[B, L]}`` (+ ``"document_boundaries"``:
    bool[B, L], True where a document starts at that input position, when enabled).
    """

    def __init__(
        self,
        streams: list[SourceStream],
        weights: list[float],
        *,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        vocab_size: int,
        eos_token_id: int,
        prefetch: int = 2,
        return_document_boundaries: bool = False,
        fingerprint: dict | None = None,
    ) -> None:
        if seq_len < 1 or micro_batch_size < 1:
            raise ValueError(f"seq_len={seq_len}, micro_batch_size={micro_batch_size}: both must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in [0, dp_size={dp_size})")
        assert len(streams) == len(weights) and streams
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self.streams = streams
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.prefetch = prefetch
        self.return_document_boundaries = return_document_boundaries
        self.fingerprint = fingerprint or {}
        self._state = LoaderState(0, [0] * len(streams))
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    # -- batches -----------------------------------------------------------------------------
    def _make(self, state: LoaderState) -> tuple[dict[str, torch.Tensor], LoaderState]:
        """The micro-batch at ``state`` for this rank and the state after it."""
        B, S = self.micro_batch_size, self.seq_len + 1
        n = self.dp_size * B
        src_of, idx_of = blend_schedule(self.weights, state=state, n=n)
        buf_BS = np.empty((B, S), dtype=np.int64)
        starts_BS = np.zeros((B, S), dtype=bool) if self.return_document_boundaries else None
        lo = self.dp_rank * B
        for b in range(B):
            self.streams[src_of[lo + b]].read(
                idx_of[lo + b], out_S=buf_BS[b], starts_S=None if starts_BS is None else starts_BS[b]
            )
        counts = list(state.per_source)
        for s in src_of:
            counts[s] += 1
        batch = {
            "input_ids": torch.from_numpy(np.ascontiguousarray(buf_BS[:, :-1])),
            "labels": torch.from_numpy(np.ascontiguousarray(buf_BS[:, 1:])),
        }
        if starts_BS is not None:
            starts_BS[:, 0] = True
            batch["document_boundaries"] = torch.from_numpy(np.ascontiguousarray(starts_BS[:, :-1]))
        return batch, LoaderState(state.windows + n, counts)

    def _produce(self, state: LoaderState, q: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                item = self._make(state)
                state = item[1]
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as err:  # hand the error to the consumer
            while not stop.is_set():
                try:
                    q.put((err, None), timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.prefetch == 0:
            batch, self._state = self._make(self._state)
            return batch
        if self._thread is None:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._produce, args=(self._state, self._queue, self._stop), daemon=True, name="megads-data"
            )
            self._thread.start()
        assert self._queue is not None
        batch, state = self._queue.get()
        if state is None:
            self.close()
            raise batch
        self._state = state
        return batch

    def close(self) -> None:
        """Stop the prefetch thread (restarted by the next ``next()``)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._queue = None

    def __del__(self) -> None:
        if getattr(self, "_thread", None) is not None:
            self._stop.set()

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """State after the last micro-batch handed out (same on every rank)."""
        return {
            "version": STATE_VERSION,
            "windows": self._state.windows,
            "per_source": list(self._state.per_source),
            "fingerprint": dict(self.fingerprint),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; ``ValueError`` if it comes from a different stream."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION}: cannot resume it")
        theirs = state.get("fingerprint", {})
        changed = [k for k in set(theirs) | set(self.fingerprint) if theirs.get(k) != self.fingerprint.get(k)]
        if changed:
            raise ValueError(
                f"data loader state was saved for a different stream (changed: {', '.join(sorted(changed))}); "
                "resume with the same data config and seq_len, or start the data stream afresh"
            )
        per_source = [int(x) for x in state["per_source"]]
        if len(per_source) != len(self.streams) or sum(per_source) != int(state["windows"]):
            raise ValueError("data loader state is inconsistent (per-source counts do not add up)")
        self.close()
        self._state = LoaderState(int(state["windows"]), per_source)


def build_train_loader(
    cfg: DataConfig, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int, progress: bool | None = None
) -> TrainLoader:
    """Prepare (or reuse) tokenizer and token files for ``cfg`` and return this rank's loader.

    Safe to call from all ranks at once: one process builds the cache, the others wait for it.
    """
    from megads.data.preprocess import prepare

    announce = print if dp_rank == 0 else (lambda _msg: None)
    prepared = prepare(cfg, progress=(dp_rank == 0) if progress is None else progress, announce=announce)
    window = seq_len + 1
    streams = [
        SourceStream(IndexedTokens(p), seed=cfg.seed, source_index=i, window=window)
        for i, p in enumerate(prepared.prefixes)
    ]
    fp = {
        "seed": cfg.seed,
        "seq_len": seq_len,
        "sources": [Path(p).parent.name for p in prepared.prefixes],
        "weights": [float(w) for w in prepared.weights],
    }
    return TrainLoader(
        streams,
        prepared.weights,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        vocab_size=prepared.tokenizer.vocab_size,
        eos_token_id=prepared.tokenizer.eos_token_id,
        prefetch=cfg.prefetch,
        return_document_boundaries=cfg.return_document_boundaries,
        fingerprint=fp,
    )
