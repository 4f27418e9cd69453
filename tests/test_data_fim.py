"""FIM: rate, exact inversion, PSM/SPM layouts, determinism, and a hypothesis fuzz of
text -> FIM -> tokens -> packing -> windows."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megads.data import fim
from megads.data.config import DataSourceConfig
from megads.data.indexed import IndexedTokens
from megads.data.loader import SourceStream, TrainLoader
from megads.data.preprocess import _split_safe, preprocess_source
from megads.data.sources import resolve_source
from megads.data.tokenizer import EOS, FIM_BEGIN, FIM_END, FIM_HOLE, load_tokenizer

from megads.testing.data import synthetic_code, tiny_tokenizer, write_token_file

MARKS = dict(eos=EOS, fb=FIM_BEGIN, fh=FIM_HOLE, fe=FIM_END)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")))


def _ids(tok):
    return dict(eos=tok.eos_token_id, fb=tok.fim_begin_id, fh=tok.fim_hole_id, fe=tok.fim_end_id)


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _docs(prefix) -> list[list[int]]:
    data = IndexedTokens(prefix)
    return [data.document(i).tolist() for i in range(data.n_docs)]


def test_fim_fraction_over_6000_documents_and_exact_inversion(tok, tmp_path):
    rng = random.Random(1)
    texts = [synthetic_code(rng, lines=3) for _ in range(6000)]
    src = resolve_source(DataSourceConfig(path=str(_jsonl(tmp_path / "d.jsonl", texts))), index=0)
    s = preprocess_source(
        src, tokenizer=tok, out_prefix=tmp_path / "t", fim_rate=0.1, fim_spm_rate=0.0, seed=7, num_workers=0,
        progress=False,
    )
    docs = _docs(tmp_path / "t")
    assert s.documents == len(docs) == 6000 and s.skipped == {}
    n_fim = sum(d[0] == tok.fim_begin_id for d in docs)
    assert n_fim == s.fim_documents
    sigma = math.sqrt(0.1 * 0.9 / 6000)
    assert abs(n_fim / 6000 - 0.1) < 3 * sigma, n_fim
    for text, ids in zip(texts, docs):  # every document, transformed or not, comes back exactly
        assert fim.undo_tokens(ids, decode=tok.decode, **_ids(tok)) == text
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


@pytest.mark.parametrize("spm_rate,order", [(0.0, "psm"), (1.0, "spm")])
def test_psm_and_spm_layouts(tok, spm_rate, order):
    text = "def f(x):\n    return x + 1\n"
    ids = _ids(tok)
    seen = 0
    for index in range(200):
        d = fim.decide(len(text), seed=3, key=11, index=index, fim_rate=1.0, spm_rate=spm_rate)
        assert d.mode == order
        pre, mid, suf = text[: d.cut_a], text[d.cut_a : d.cut_b], text[d.cut_b :]
        enc = lambda s: tok.encode_documents([s])[0]
        out = fim.assemble(d.mode, piece_ids=[enc(p) for p in fim.pieces(text, decision=d)], **ids)
        if order == "psm":
            want = [ids["fb"], *enc(pre), ids["fh"], *enc(suf), ids["fe"], *enc(mid), ids["eos"]]
            assert fim.render(text, decision=d, **MARKS) == f"{FIM_BEGIN}{pre}{FIM_HOLE}{suf}{FIM_END}{mid}{EOS}"
        else:
            want = [ids["fb"], ids["fh"], *enc(suf), ids["fe"], *enc(pre), *enc(mid), ids["eos"]]
            assert fim.render(text, decision=d, **MARKS) == f"{FIM_BEGIN}{FIM_HOLE}{suf}{FIM_END}{pre}{mid}{EOS}"
        assert out == want
        assert fim.undo_text(fim.render(text, decision=d, **MARKS), **MARKS) == text
        seen += d.cut_a < d.cut_b
    assert seen > 150  # cut points really vary


def test_split_points_are_uniform_over_characters():
    n, trials = 9, 20000
    counts = np.zeros(n + 1)
    for i in range(trials):
        d = fim.decide(n, seed=0, key=1, index=i, fim_rate=1.0, spm_rate=0.0)
        counts[d.cut_a] += 1
        counts[d.cut_b] += 1
    # min/max of two uniform draws over 0..n: together they are uniform
    expected = 2 * trials / (n + 1)
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected)), counts


def test_decisions_are_seeded_per_document():
    a = [fim.decide(100, seed=1, key=5, index=i, fim_rate=0.5, spm_rate=0.5) for i in range(300)]
    b = [fim.decide(100, seed=1, key=5, index=i, fim_rate=0.5, spm_rate=0.5) for i in range(300)]
    c = [fim.decide(100, seed=2, key=5, index=i, fim_rate=0.5, spm_rate=0.5) for i in range(300)]
    assert a == b and a != c


def test_output_independent_of_worker_count(tok, tmp_path):
    rng = random.Random(2)
    src = resolve_source(
        DataSourceConfig(path=str(_jsonl(tmp_path / "d.jsonl", [synthetic_code(rng) for _ in range(3000)]))), index=0
    )
    for workers in (0, 2):
        preprocess_source(
            src, tokenizer=tok, out_prefix=tmp_path / f"w{workers}", fim_rate=0.3, fim_spm_rate=0.5, seed=1,
            num_workers=workers, progress=False,
        )
    assert (tmp_path / "w0.bin").read_bytes() == (tmp_path / "w2.bin").read_bytes()
    assert (tmp_path / "w0.idx").read_bytes() == (tmp_path / "w2.idx").read_bytes()


def test_marker_text_inside_a_document_never_becomes_a_special_token(tok):
    text = f"s = '{FIM_BEGIN}{FIM_HOLE}{FIM_END}{EOS}'\n"
    ids = tok.encode_documents([text])[0]
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == text


code_text = st.text(
    alphabet=st.sampled_from(list("abcXYZ019 _()[]:=\n\t    ") + ["é", "✓", "日", "\r", "\u00a0"]), max_size=200
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=code_text, limit=st.integers(1, 40))
def test_fuzz_safe_split_keeps_tokens(tok, text, limit):
    parts = _split_safe(text, limit=limit)
    assert "".join(parts) == text
    whole = tok.encode_documents([text])[0]
    assert [t for p in tok.encode_documents(parts) for t in p] == whole


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    texts=st.lists(code_text.filter(lambda s: s.strip() != ""), min_size=1, max_size=12),
    rate=st.sampled_from([0.0, 0.5, 1.0]),
    spm=st.sampled_from([0.0, 0.5, 1.0]),
    seq_len=st.integers(1, 24),
    seed=st.integers(0, 3),
)
def test_fuzz_text_fim_tokens_packing(tok, tmp_path_factory, texts, rate, spm, seq_len, seed):
    ids = _ids(tok)
    docs = []
    for i, text in enumerate(texts):
        d = fim.decide(len(text), seed=seed, key=9, index=i, fim_rate=rate, spm_rate=spm)
        out = fim.assemble(d.mode, piece_ids=tok.encode_documents(list(fim.pieces(text, decision=d))), **ids)
        assert fim.undo_tokens(out, decode=tok.decode, **ids) == text
        assert out.count(ids["eos"]) == 1 and out[-1] == ids["eos"]
        docs.append(np.array(out))
    prefix = write_token_file(tmp_path_factory.mktemp("fz") / "t", docs=docs, vocab_size=tok.vocab_size)
    stream = SourceStream(IndexedTokens(prefix), seed=seed, source_index=0, window=seq_len + 1)
    loader = TrainLoader(
        [stream], [1.0], seq_len=seq_len, micro_batch_size=1, dp_rank=0, dp_size=1,
        vocab_size=tok.vocab_size, eos_token_id=ids["eos"], prefetch=0,
    )
    n_tok = sum(d.size for d in docs)
    n_win = -(-n_tok // (seq_len + 1))  # windows starting in epoch 0
    windows = {}
    for k in range(n_win):
        b = next(loader)
        assert b["labels"][0, :-1].tolist() == b["input_ids"][0, 1:].tolist()
        windows[stream.window_start(k)] = b["input_ids"][0].tolist() + [b["labels"][0, -1].item()]
    # the epoch's windows are a shuffle of the tiling of the stream: each start exactly once
    assert sorted(windows) == [k * (seq_len + 1) for k in range(n_win)]
    got = [t for start in sorted(windows) for t in windows[start]]
    # the first n_tok tokens are a permutation of whole documents: split at EOS, compare multisets
    epoch = got[:n_tok]
    pieces, cur = [], []
    for t in epoch:
        cur.append(t)
        if t == ids["eos"]:
            pieces.append(tuple(cur))
            cur = []
    assert not cur
    assert sorted(pieces) == sorted(tuple(d.tolist()) for d in docs)


@pytest.fixture(scope="module")
def hf_tok(tok):
    return load_tokenizer(tok.path, fast=False)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=300) | code_text)
def test_fuzz_tiktoken_fast_path_equals_hugging_face(tok, hf_tok, text):
    assert tok.encoder == "tiktoken" and hf_tok.encoder == "hf"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return  # lone surrogates are skipped before encoding (counted as invalid_utf8)
    want = hf_tok.encode_documents([text])
    assert tok.encode_documents([text]) == want
    for t in (tok, hf_tok):  # the per-text numpy variant used by preprocessing
        assert [a.tolist() for a in t.encode_arrays([text], dtype=np.dtype(np.uint16))] == want


def test_fast_path_falls_back_on_long_runs(tok, hf_tok):
    text = "x = '" + "ab" * 3000 + "'\n"  # a 6000-character word: quadratic in tiktoken
    assert tok.encode_documents([text]) == hf_tok.encode_documents([text])
