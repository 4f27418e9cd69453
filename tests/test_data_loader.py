"""Packed loader: exact-once epochs across ranks, seeds, blending, boundaries, exact resume in a
new process, and concurrent cache builds."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from megads.data.config import DataConfig, DataSourceConfig
from megads.data.indexed import IndexedTokens
from megads.data.loader import SourceStream, TrainLoader, build_train_loader
from megads.data.tokenizer import load_tokenizer

from megads.testing.data import (
    prepare_in_process,
    resumed_batches,
    synthetic_code,
    tiny_tokenizer,
    write_token_file,
)

BIG_VOCAB = 1 << 20  # uint32 token files: every synthetic token id can be unique


def _unique_docs(n_docs: int, *, start: int = 0, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 30, size=n_docs)
    ends = start + np.cumsum(lengths)
    return [np.arange(e - n, e) for e, n in zip(ends, lengths)]


def _loader(prefixes, weights, *, seq_len, mbs, rank, world, seed=0, boundaries=False, eos=0):
    streams = [SourceStream(IndexedTokens(p), seed=seed, source_index=i, window=seq_len + 1) for i, p in enumerate(prefixes)]
    return TrainLoader(
        streams, weights, seq_len=seq_len, micro_batch_size=mbs, dp_rank=rank, dp_size=world,
        vocab_size=BIG_VOCAB, eos_token_id=eos, prefetch=2, return_document_boundaries=boundaries,
    )


def _window_rows(batch) -> np.ndarray:
    return np.concatenate([batch["input_ids"].numpy(), batch["labels"].numpy()[:, -1:]], axis=1)


@pytest.mark.parametrize("world,mbs,seq_len", [(1, 1, 5), (2, 2, 7), (3, 1, 16), (4, 3, 3)])
def test_one_epoch_covers_every_token_exactly_once_across_ranks(tmp_path, world, mbs, seq_len):
    docs = _unique_docs(120, seed=world)
    n_tok = sum(d.size for d in docs)
    prefix = write_token_file(tmp_path / "t", docs=docs, vocab_size=BIG_VOCAB)
    S = seq_len + 1
    n_win = -(-n_tok // S)  # windows starting in epoch 0
    steps = -(-n_win // (world * mbs))
    by_global: dict[int, np.ndarray] = {}
    for rank in range(world):
        loader = _loader([prefix], [1.0], seq_len=seq_len, mbs=mbs, rank=rank, world=world)
        for step in range(steps):
            for b, row in enumerate(_window_rows(next(loader))):
                g = step * world * mbs + rank * mbs + b
                assert g not in by_global  # ranks never overlap
                by_global[g] = row
        loader.close()
    epoch = np.concatenate([by_global[g] for g in range(n_win)])
    counts = Counter(epoch.tolist())
    assert set(counts) == set(range(n_tok))  # every token of every document appears
    overflow = n_win * S - n_tok  # the last window of the epoch runs into the next epoch
    assert sum(c - 1 for c in counts.values()) == overflow and max(counts.values()) <= 2


def test_same_seed_same_stream_different_seed_different(tmp_path):
    prefix = write_token_file(tmp_path / "t", docs=_unique_docs(200), vocab_size=BIG_VOCAB)

    def stream(seed):
        loader = _loader([prefix], [1.0], seq_len=9, mbs=2, rank=0, world=1, seed=seed)
        out = np.stack([_window_rows(next(loader)) for _ in range(30)])
        loader.close()
        return out

    a, b, c = stream(1), stream(1), stream(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # and the shuffle is real: the stream is not the documents in file order
    assert not np.array_equal(a.reshape(-1)[:100], np.arange(100))


def test_blending_follows_weights(tmp_path):
    pa = write_token_file(tmp_path / "a", docs=_unique_docs(300, start=0), vocab_size=BIG_VOCAB)
    pb = write_token_file(tmp_path / "b", docs=_unique_docs(50, start=500_000), vocab_size=BIG_VOCAB)
    n, hits_a = 0, 0
    for rank in range(2):
        loader = _loader([pa, pb], [0.7, 0.3], seq_len=15, mbs=4, rank=rank, world=2)
        for _ in range(250):
            rows = _window_rows(next(loader))
            assert np.all((rows < 500_000).all(1) | (rows >= 500_000).all(1))  # windows never mix sources
            hits_a += int((rows < 500_000).all(1).sum())
            n += rows.shape[0]
        loader.close()
    sigma = math.sqrt(0.7 * 0.3 / n)
    assert abs(hits_a / n - 0.7) < 3 * sigma, hits_a / n


def test_document_boundaries_mark_document_starts(tmp_path):
    rng = np.random.default_rng(3)
    docs = [np.append(rng.integers(1, 1000, size=int(rng.integers(0, 12))), 0) for _ in range(300)]  # EOS = 0
    prefix = write_token_file(tmp_path / "t", docs=docs, vocab_size=1000)
    loader = _loader([prefix], [1.0], seq_len=11, mbs=3, rank=0, world=1, boundaries=True)
    for _ in range(40):
        batch = next(loader)
        ids, starts = batch["input_ids"].numpy(), batch["document_boundaries"].numpy()
        assert starts.dtype == bool and starts.shape == ids.shape and starts[:, 0].all()
        np.testing.assert_array_equal(starts[:, 1:], ids[:, :-1] == 0)
    loader.close()


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory) -> DataConfig:
    root = tmp_path_factory.mktemp("cfg")
    rng = random.Random(0)
    for name, n in (("a", 400), ("b", 150)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": synthetic_code(rng)}) + "\n" for _ in range(n)))
    tok = load_tokenizer(str(tiny_tokenizer(root / "tok")))
    return DataConfig(
        sources=[DataSourceConfig(path=str(root / "a.jsonl"), weight=2.0), DataSourceConfig(path=str(root / "b.jsonl"))],
        tokenizer=tok.path,
        vocab_size=tok.vocab_size,  # otherwise prepare() warns that vocab_size is ignored
        cache_dir=str(root / "cache"),
        num_preprocess_workers=0,
        fim_rate=0.5,
    )


def _as_dict(cfg: DataConfig) -> dict:
    return dataclasses.asdict(cfg)


def test_resume_in_a_new_process_gives_the_uninterrupted_batches(small_cfg):
    total, seq_len, mbs = 14, 16, 2
    cases = []
    for world in (1, 2, 3):
        for rank in sorted({0, world - 1}):
            ref_loader = build_train_loader(small_cfg, seq_len=seq_len, micro_batch_size=mbs, dp_rank=rank, dp_size=world)
            ref, states = [], [ref_loader.state_dict()]
            for _ in range(total):
                ref.append({k: v.numpy().copy() for k, v in next(ref_loader).items()})
                states.append(ref_loader.state_dict())  # taken while the prefetch thread runs ahead
            ref_loader.close()
            for k in (0, 1, 5, 13):
                cases.append((world, rank, k, states[k], ref[k:]))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # a new interpreter rebuilds every loader
        futures = [
            pool.submit(
                resumed_batches, _as_dict(small_cfg), seq_len=seq_len, micro_batch_size=mbs, dp_rank=rank,
                dp_size=world, state=state, n=len(want),
            )
            for world, rank, k, state, want in cases
        ]
        for (world, rank, k, _, want), fut in zip(cases, futures):
            got = fut.result()
            assert len(got) == len(want)
            for g, w in zip(got, want):
                for key in ("input_ids", "labels"):
                    np.testing.assert_array_equal(g[key], w[key], err_msg=f"world={world} rank={rank} k={k}")


def test_resume_with_another_layout_continues_the_global_stream(small_cfg):
    a = build_train_loader(small_cfg, seq_len=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    rows = [_window_rows(next(a)) for _ in range(6)]
    state = a.state_dict()
    rows_next = [_window_rows(next(a)) for _ in range(2)]
    a.close()
    # the same 4 global windows, read by 2 ranks with micro-batch 1 after the restart
    got = []
    for rank in range(2):
        b = build_train_loader(small_cfg, seq_len=8, micro_batch_size=1, dp_rank=rank, dp_size=2)
        b.load_state_dict(state)
        got.append([_window_rows(next(b)) for _ in range(2)])
        b.close()
    want = np.concatenate(rows_next)
    np.testing.assert_array_equal(np.concatenate([got[0][0], got[1][0], got[0][1], got[1][1]]), want)
    assert len(rows) == 6
    c = build_train_loader(small_cfg, seq_len=9, micro_batch_size=2, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="changed: seq_len"):
        c.load_state_dict(state)


def test_loader_reports_tokenizer_facts(small_cfg):
    loader = build_train_loader(small_cfg, seq_len=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    batch = next(loader)
    loader.close()
    tok = load_tokenizer(small_cfg.tokenizer)
    assert loader.vocab_size == tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
    assert loader.eos_token_id == tok.eos_token_id == tok.backend.token_to_id("<|end_of_sentence|>")
    assert batch["input_ids"].dtype == batch["labels"].dtype and batch["input_ids"].shape == (2, 8)
    assert int(batch["input_ids"].max()) < loader.vocab_size


def test_concurrent_ranks_build_the_cache_once(tmp_path, small_cfg):
    cfg = dataclasses.replace(small_cfg, cache_dir=str(tmp_path / "cache"))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(3, mp_context=ctx) as pool:
        results = list(pool.map(prepare_in_process, [_as_dict(cfg)] * 3))
    assert len({tuple(p) for p, _ in results}) == 1
    built = [not any(reused) for _, reused in results]
    assert sum(built) == 1, results  # exactly one process tokenized, the others reused its files
    leftovers = [p.name for p in (tmp_path / "cache" / "datasets").iterdir() if ".tmp-" in p.name]
    assert leftovers == []
