"""Bad data (issue 16, item 5): fuzzed inputs for the data entry points.

Seeded random damage -- byte flips, truncations, inserted invalid UTF-8, NUL runs, broken JSON
lines, huge and empty documents -- to JSON-lines and plain-text sources and to built token files.
The property, for every case: preprocessing either succeeds, with every input document accounted
for as tokens or as a counted skip, or raises ValueError naming the damaged file; nothing else
escapes, and a failed build leaves no loadable token file behind (writes are atomic). A damaged
token file is refused naming the file, at open or at `verify()` (checksum), or reads back exactly
what was written (damage that changed nothing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from megads.data.config import DataSourceConfig
from megads.data.indexed import IndexedTokens
from megads.data.preprocess import preprocess_source
from megads.data.sources import resolve_source
from megads.data.tokenizer import load_tokenizer

from megads.testing.data import synthetic_code, tiny_tokenizer, write_token_file

N_CASES = 24


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return load_tokenizer(str(tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")))


def _damage(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(["flip", "truncate", "utf8", "nul", "json", "huge", "empty", "binary"])
        at = rng.randrange(max(1, len(b)))
        if kind == "flip" and b:
            b[at] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del b[at:]
        elif kind == "utf8":
            b[at:at] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        elif kind == "nul":
            b[at:at] = b"\0" * rng.randint(1, 64)
        elif kind == "json":
            b[at:at] = rng.choice([b'\n{"text": oops\n', b"\n{]\n", b'\n{"text": 5}\n', b'\n{"body": "x"}\n', b"\n\n"])
        elif kind == "huge":
            b[at:at] = b"x = 1\n" * rng.randint(1_000, 50_000)
        elif kind == "empty":
            b[at:at] = b'\n{"text": ""}\n{"text": "   "}\n'
        elif kind == "binary":
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 256)))
    return bytes(b)


def _sources(tmp: Path, rng: random.Random) -> tuple[Path, Path]:
    docs = [synthetic_code(rng, lines=rng.randint(1, 40)) for _ in range(8)]
    jsonl = tmp / "docs.jsonl"
    jsonl.write_bytes(_damage("".join(json.dumps({"text": d}) + "\n" for d in docs).encode(), rng))
    folder = tmp / "files"
    folder.mkdir()
    for i, d in enumerate(docs[:4]):
        (folder / f"f{i}.py").write_bytes(_damage(d.encode(), rng) if i % 2 else d.encode())
    return jsonl, folder


@pytest.mark.parametrize("case", range(N_CASES))
def test_fuzzed_sources_are_processed_or_refused_naming_the_file(case: int, tok, tmp_path: Path) -> None:  # noqa: ANN001
    rng = random.Random(case)
    for path in _sources(tmp_path, rng):
        out = tmp_path / f"out_{path.name}"
        src = resolve_source(DataSourceConfig(path=str(path)), index=0)
        try:
            s = preprocess_source(src, tokenizer=tok, out_prefix=out, fim_rate=0.1, fim_spm_rate=0.0, seed=case,
                                  num_workers=0, progress=False)
        except ValueError as e:
            assert path.name in str(e), str(e)
            with pytest.raises(ValueError):  # nothing half-written is loadable
                IndexedTokens(out)
            continue
        data = IndexedTokens(out)
        data.verify()
        assert data.n_docs == s.documents
        assert s.documents + sum(s.skipped.values()) >= 1  # every document became tokens or a counted skip
        assert int(data.tokens[: data.n_tokens].max()) < tok.vocab_size


@pytest.mark.parametrize("case", range(N_CASES))
def test_fuzzed_token_files_are_refused_naming_the_file_or_read_unchanged(case: int, tmp_path: Path) -> None:
    rng = random.Random(1000 + case)
    nprng = np.random.default_rng(case)
    docs = [nprng.integers(0, 5000, size=int(nprng.integers(1, 300))) for _ in range(40)]
    write_token_file(tmp_path / "t", docs=docs, vocab_size=5000)
    which = rng.choice(["idx", "bin"])
    f = tmp_path / f"t.{which}"
    f.write_bytes(_damage(f.read_bytes(), rng))
    try:
        data = IndexedTokens(tmp_path / "t")
        data.verify()
    except ValueError as e:
        assert f"t.{which}" in str(e) or "t.idx" in str(e) or "t.bin" in str(e), str(e)
        return
    for i, d in enumerate(docs):  # accepted: then it must be what was written
        np.testing.assert_array_equal(data.document(i), d)


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_file(tmp_path: Path) -> None:
    for bad in (np.array([1, 2, 5000]), np.array([3, -1])):
        with pytest.raises(ValueError, match=r"t\.bin: token id (5000|-1) is outside the vocabulary \[0, 5000\)"):
            write_token_file(tmp_path / "t", docs=[np.array([7, 8]), bad], vocab_size=5000)
        with pytest.raises(ValueError):  # nothing published
            IndexedTokens(tmp_path / "t")
