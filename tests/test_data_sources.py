"""Ingestion and bad input: every format, and each bad case is a counted skip or a clear error."""

from __future__ import annotations

import json
import random

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megads.data import preprocess
from megads.data.config import DataConfig, DataSourceConfig
from megads.data.indexed import IndexedTokens
from megads.data.preprocess import preprocess_source
from megads.data.sources import builtin_stdlib_files, iter_documents, resolve_source
from megads.data.tokenizer import load_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers

from megads.testing.data import synthetic_code, tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")))


def _run(tok, path, tmp_path, **src_kw):
    src = resolve_source(DataSourceConfig(path=str(path), **src_kw), index=0)
    s = preprocess_source(
        src, tokenizer=tok, out_prefix=tmp_path / "out", fim_rate=0.0, fim_spm_rate=0.0, seed=0, num_workers=0,
        progress=False,
    )
    data = IndexedTokens(tmp_path / "out")
    texts = [tok.decode(data.document(i)[:-1].tolist()) for i in range(data.n_docs)]
    return s, texts


def test_folder_of_mixed_files_with_counted_skips(tok, tmp_path):
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "a.py").write_text("def a():\n    return 1\n")
    (d / "empty.py").write_bytes(b"")
    (d / "blank.txt").write_text("  \n\t\n")
    (d / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (d / ".hidden.py").write_text("hidden = True\n")
    (d / "sub" / "r.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"text": "j1"}, {"text": ""}, {"other": 1}, {"text": 7}, {"text": "j2"}])
    )
    pq.write_table(pa.table({"text": ["p1", None, "p2"]}), d / "sub" / "t.parquet")
    s, texts = _run(tok, d, tmp_path)
    assert texts == ["def a():\n    return 1\n", "j1", "j2", "p1", "p2"]
    assert s.skipped == {
        "empty_file": 1, "empty_document": 2, "invalid_utf8": 1, "missing_text_field": 2, "not_a_string": 1,
    }
    assert s.documents == 5
    assert any("latin1.py:byte 8" in e for e in s.skipped_examples["invalid_utf8"])
    assert any("r.jsonl:3" in e for e in s.skipped_examples["missing_text_field"])
    assert "empty_document: 2" in "\n".join(s.lines())


def test_saved_dataset_folder_and_text_field(tok, tmp_path):
    datasets.Dataset.from_dict({"content": ["x = 1\n", "   ", "y = 2\n"], "n": [1, 2, 3]}).save_to_disk(
        str(tmp_path / "saved")
    )
    s, texts = _run(tok, tmp_path / "saved", tmp_path, text_field="content")
    assert texts == ["x = 1\n", "y = 2\n"] and s.skipped == {"empty_document": 1}
    with pytest.raises(ValueError, match=r"saved: no column 'text' \(columns: content, n\)"):
        list(iter_documents(resolve_source(DataSourceConfig(path=str(tmp_path / "saved")), index=0)))


def test_missing_field_missing_path_and_bad_json_are_errors_naming_the_file(tmp_path):
    f = tmp_path / "body.jsonl"
    f.write_text('{"body": "a"}\n')
    with pytest.raises(ValueError, match=r"body\.jsonl: record 1 has no field 'text' \(fields: body\); set"):
        list(iter_documents(resolve_source(DataSourceConfig(path=str(f)), index=0)))
    with pytest.raises(ValueError, match=r"data\.sources\[3\]\.path=.*nope: no such file or folder"):
        resolve_source(DataSourceConfig(path=str(tmp_path / "nope")), index=3)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: could not be read as json .*UTF-8"):
        list(iter_documents(resolve_source(DataSourceConfig(path=str(bad)), index=0)))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "ok"}\n{"text": oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl: could not be read as json .*row 1"):
        list(iter_documents(resolve_source(DataSourceConfig(path=str(broken)), index=0)))


def test_tokenizer_without_fim_tokens_is_refused(tmp_path):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.add_special_tokens(["<|end_of_sentence|>"])
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json lacks the special tokens <\|fim_begin\|>.*train_tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"data\.sources\[0\]\.weight=0"):
        DataConfig(sources=[DataSourceConfig(path="x", weight=0)]).validate()
    with pytest.raises(ValueError, match=r"data\.fim_rate"):
        DataConfig(fim_rate=1.5).validate()
    DataConfig().validate()


def test_long_document_is_segmented_with_identical_tokens(tok, tmp_path, monkeypatch):
    rng = random.Random(5)
    text = "".join(synthetic_code(rng, lines=20) for _ in range(600))  # ~100 KB, one document
    (tmp_path / "big.py").write_text(text)
    monkeypatch.setattr(preprocess, "SEGMENT_CHARS", 2000)  # force ~50 segments
    s, texts = _run(tok, tmp_path / "big.py", tmp_path)
    assert texts == [text]
    assert IndexedTokens(tmp_path / "out").document(0)[:-1].tolist() == tok.encode_documents([text])[0]


@pytest.mark.slow
def test_single_50mb_document(tok, tmp_path):
    rng = random.Random(6)
    unit = "".join(synthetic_code(rng, lines=20) for _ in range(2000))
    text = unit * (50_000_000 // len(unit) + 1)
    (tmp_path / "huge.py").write_text(text)
    s, texts = _run(tok, tmp_path / "huge.py", tmp_path)
    assert s.documents == 1 and texts == [text]


def test_builtin_corpus_is_stdlib_python_only():
    files = builtin_stdlib_files()
    assert len(files) > 500
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)


def test_prepare_tool_builds_then_reuses_the_cache(tmp_path, capsys):
    from tools.prepare_data import main

    rng = random.Random(8)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": synthetic_code(rng)}) + "\n" for _ in range(200)))
    tok_dir = tiny_tokenizer(tmp_path / "tok")
    args = [f"sources=[{{path: {corpus}}}]", f"tokenizer={tok_dir}", f"cache_dir={tmp_path / 'cache'}",
            "num_preprocess_workers=0"]
    with pytest.warns(UserWarning, match=r"data\.vocab_size=8192 is ignored"):  # the tokenizer is given
        assert main(args) == 0
    first = capsys.readouterr().out
    with pytest.warns(UserWarning, match="is ignored"):
        assert main(args) == 0
    second = capsys.readouterr().out
    assert "prepared tokenizer and token files" in first and "200 documents" in first
    assert "reused the cached tokenizer and token files" in second and "[reused cache]" in second
    assert main(["data.fim_rat=0.2"]) == 2
    assert "fim_rat" in capsys.readouterr().err
