"""Elastic resume of both data loaders: a run saved at dp=4 and continued at another dp size and
micro-batch size sees exactly the samples of an uninterrupted dp=1 run (0 duplicated, 0 skipped).

Each run is simulated in one process: `dp` loader objects, one per data-parallel rank, each
taking M = G / (dp * B) micro-batches per optimizer step (G sequences per step, fixed). The
sample id is read from the token content, so neither loader needs a test-only output:
- TrainLoader reads token files whose token ids are all distinct, so a window's tokens identify
  it (two epochs may, rarely, cut an identical window; the comparison is of multisets, so such a
  window simply counts twice on both sides);
- ByteLoader reads a corpus of 8-byte lines "%07d\\n" with seq_len 8, so window w starts with the
  digits of w.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import pytest
from megads.data.indexed import IndexedTokens
from megads.data.loader import SourceStream, TrainLoader

from megads.testing.data import write_token_file
from megads.train.fallback_data import ByteLoader, FallbackDataConfig

G = 24  # sequences per optimizer step, the same before and after the resume
STEPS = 20  # a few epochs of every source, so resumes and micro-steps straddle epoch ends
VOCAB = 1 << 20

MakeLoader = Callable[..., object]  # (rank=, dp=, mbs=) -> loader
SampleIds = Callable[[dict], list[Hashable]]  # batch -> one id per sequence


def _run(make: MakeLoader, ids: SampleIds, *, dp: int, mbs: int, steps: int, state: dict | None = None):
    """Sample ids of each step (in global order) and, after each step, every rank's loader state."""
    assert G % (dp * mbs) == 0
    loaders = [make(rank=r, dp=dp, mbs=mbs) for r in range(dp)]
    if state is not None:
        for loader in loaders:
            loader.load_state_dict(state)
    per_step, states = [], []
    for _ in range(steps):
        step_ids: list[Hashable] = []
        for _micro in range(G // (dp * mbs)):
            for loader in loaders:  # micro-step s, rank r, row b: global position s*dp*B + r*B + b
                step_ids += ids(next(loader))
        per_step.append(step_ids)
        states.append([loader.state_dict() for loader in loaders])
    for loader in loaders:
        getattr(loader, "close", lambda: None)()
    return per_step, states


def _check_elastic_resume(make: MakeLoader, ids: SampleIds, *, before: tuple[int, int], after: tuple[int, int],
                          k: int) -> None:
    ref, ref_states = _run(make, ids, dp=1, mbs=1, steps=STEPS)  # uninterrupted
    dp0, mbs0 = before
    first, states = _run(make, ids, dp=dp0, mbs=mbs0, steps=k)
    saved = states[-1]
    assert all(s == saved[0] for s in saved), f"ranks saved different states after step {k}: {saved}"
    assert saved[0] == ref_states[k - 1][0], "the state after a full step depends on the layout"
    dp1, mbs1 = after
    rest, _ = _run(make, ids, dp=dp1, mbs=mbs1, steps=STEPS - k, state=saved[0])
    resumed = first + rest

    want = Counter(i for step in ref for i in step)
    got = Counter(i for step in resumed for i in step)
    duplicated = sum((got - want).values())
    skipped = sum((want - got).values())
    assert len(want) > G  # the ids tell samples apart
    assert duplicated == 0 and skipped == 0, (
        f"dp={dp0} B={mbs0} -> dp={dp1} B={mbs1} at step {k}: {duplicated} duplicated, {skipped} skipped "
        f"of {sum(want.values())} samples"
    )
    for t, (a, b) in enumerate(zip(ref, resumed, strict=True)):
        assert Counter(a) == Counter(b), f"step {t + 1} trained on other samples than the dp=1 run"


LAYOUTS = [((4, 2), (2, 3), 7), ((4, 3), (2, 4), 11), ((4, 1), (3, 8), 1)]  # (dp, B) -> (dp', B'), k


# -- TrainLoader (the data pipeline) ---------------------------------------------------------

def _distinct_docs(n_docs: int, *, start: int, seed: int) -> list[np.ndarray]:
    lengths = np.random.default_rng(seed).integers(1, 30, size=n_docs)
    ends = start + np.cumsum(lengths)
    return [np.arange(e - n, e) for e, n in zip(ends, lengths, strict=True)]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("tokens")
    a = _distinct_docs(60, start=1, seed=0)  # ~900 tokens, ~110 windows of 8 per epoch
    b = _distinct_docs(30, start=int(a[-1][-1]) + 1, seed=1)  # ids continue: distinct across sources
    return [write_token_file(root / "a", docs=a, vocab_size=VOCAB), write_token_file(root / "b", docs=b, vocab_size=VOCAB)]


def _window_ids(batch: dict) -> list[Hashable]:
    rows_BS = np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)
    return [tuple(row.tolist()) for row in rows_BS]


@pytest.mark.parametrize("before,after,k", LAYOUTS)
def test_train_loader_resumes_under_another_dp_size(two_sources, before, after, k):
    def make(*, rank: int, dp: int, mbs: int) -> TrainLoader:
        streams = [SourceStream(IndexedTokens(p), seed=5, source_index=i, window=8) for i, p in enumerate(two_sources)]
        return TrainLoader(streams, [0.7, 0.3], seq_len=7, micro_batch_size=mbs, dp_rank=rank, dp_size=dp,
                           vocab_size=VOCAB, eos_token_id=0, prefetch=2)

    _check_elastic_resume(make, _window_ids, before=before, after=after, k=k)


# -- ByteLoader (the fallback source) --------------------------------------------------------

N_LINES = 203  # windows per epoch: no layout here divides it, so micro-steps straddle epoch ends


@pytest.fixture(scope="module")
def numbered_corpus(tmp_path_factory) -> FallbackDataConfig:
    root = tmp_path_factory.mktemp("corpus")
    (root / "lines.py").write_text("".join(f"{i:07d}\n" for i in range(N_LINES)))
    return FallbackDataConfig(root=str(root), max_bytes=1 << 20, seed=3)


def _line_ids(batch: dict) -> list[Hashable]:
    return [int(bytes(row[:7].tolist()).decode()) for row in batch["input_ids"]]


def _byte_maker(cfg: FallbackDataConfig) -> MakeLoader:
    def make(*, rank: int, dp: int, mbs: int) -> ByteLoader:
        loader = ByteLoader(cfg, seq_len=8, micro_batch_size=mbs, dp_rank=rank, dp_size=dp)
        assert loader.n_windows == N_LINES
        return loader

    return make


@pytest.mark.parametrize("before,after,k", LAYOUTS)
def test_byte_loader_resumes_under_another_dp_size(numbered_corpus, before, after, k):
    _check_elastic_resume(_byte_maker(numbered_corpus), _line_ids, before=before, after=after, k=k)


def test_byte_loader_epoch_visits_every_window_once(numbered_corpus):
    per_step, _ = _run(_byte_maker(numbered_corpus), _line_ids, dp=4, mbs=2, steps=STEPS)
    stream = [i for step in per_step for i in step]
    for e in range(len(stream) // N_LINES):
        assert sorted(stream[e * N_LINES : (e + 1) * N_LINES]) == list(range(N_LINES)), f"epoch {e}"


def test_byte_loader_refuses_a_state_it_cannot_continue(numbered_corpus):
    loader = _byte_maker(numbered_corpus)(rank=0, dp=2, mbs=2)
    with pytest.raises(ValueError, match="per-rank .* older megads.*start the data stream afresh"):
        loader.load_state_dict({"epoch": 1, "cursor": 6, "dp_rank": 0, "dp_size": 2})
    other = ByteLoader(numbered_corpus, seq_len=4, micro_batch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match="different stream .*seq_len 4 -> 8"):
        loader.load_state_dict(other.state_dict())
