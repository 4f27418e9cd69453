"""Bad data (issue 16, item 5): fuzzed inputs for the data entry points.

Seeded random damage -- byte flips, truncations, inserted invalid UTF-8, NUL runs, broken JSON
lines, huge and empty documents -- to JSON-lines and plain-text sources and to built token files;
to parquet files (byte flips, truncation, a wrong column name or type, no rows, compressed or
not) and to `Dataset.save_to_disk` folders (flipped, truncated or missing .arrow files, damaged
or wrong state.json / dataset_info.json, a wrong column, no rows).
The property, for every case: preprocessing either succeeds, with every input document accounted
for as tokens or as a counted skip, or raises ValueError naming the damaged file; nothing else
escapes, and a failed build leaves no loadable token file behind (writes are atomic). A damaged
token file is refused naming the file, at open or at `verify()` (checksum), or reads back exactly
what was written (damage that changed nothing). For parquet and saved datasets, a processed
source accounts for every row it holds (tokens or a counted skip).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from megads.data.config import DataSourceConfig
from megads.data.indexed import IndexedTokens
from megads.data.preprocess import preprocess_source
from megads.data.sources import resolve_source
from megads.data.tokenizer import load_tokenizer

from megads.testing.data import synthetic_code, tiny_tokenizer, write_token_file

N_CASES = 24
datasets.disable_progress_bars()  # save_to_disk's bars, in every case


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


# ------------------------------------------------------------------------ parquet and saved datasets
def _flip_or_cut(path: Path, rng: random.Random) -> None:
    b = bytearray(path.read_bytes())
    if rng.random() < 0.3:
        del b[rng.randrange(len(b)):]
    else:
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(b))


def _invalid_utf8_inside(path: Path, text: str) -> None:
    """One byte of `text`, where it is stored uncompressed in `path`, made 0xFF (never UTF-8)."""
    b = bytearray(path.read_bytes())
    at = b.find(text.encode())
    assert at >= 0
    b[at] = 0xFF
    path.write_bytes(bytes(b))


PARQUET_KINDS = ("bytes", "bytes", "utf8", "wrong_column", "wrong_type", "no_rows")
SAVED_KINDS = ("arrow", "arrow", "utf8", "missing_arrow", "state", "info", "info_type", "wrong_column", "no_rows")
# the outcome each kind must have (None: either, as the random damage falls), and the skip it counts
EXPECTED: dict[str, tuple[str | None, str | None]] = {
    "bytes": (None, None), "arrow": (None, None), "info": (None, None),  # "{}" still loads: the Arrow schema wins
    "utf8": (None, None),  # parquet: pyarrow's reader refuses it; saved: a counted invalid_utf8 skip (asserted below)
    "wrong_column": ("refused", None), "missing_arrow": ("refused", None), "state": ("refused", None),
    "info_type": ("refused", None), "wrong_type": ("processed", "not_a_string"), "no_rows": ("processed", "empty_file"),
}


def _parquet_case(tmp: Path, case: int) -> tuple[Path, int, str]:
    """A damaged parquet file, the rows written, the damage (the kinds in turn, the rest seeded)."""
    rng = random.Random(case)
    docs = [synthetic_code(rng, lines=rng.randint(1, 40)) for _ in range(rng.randint(1, 60))]
    kind = PARQUET_KINDS[case % len(PARQUET_KINDS)]
    table = {"bytes": pa.table({"text": docs, "n": list(range(len(docs)))}), "utf8": pa.table({"text": docs}),
             "wrong_column": pa.table({"body": docs}), "wrong_type": pa.table({"text": list(range(len(docs)))}),
             "no_rows": pa.table({"text": pa.array([], pa.string())})}[kind]
    path = tmp / "docs.parquet"
    codec = "none" if kind == "utf8" else rng.choice(["snappy", "none", "zstd"])
    pq.write_table(table, path, compression=codec, use_dictionary=kind != "utf8")
    if kind == "bytes":
        _flip_or_cut(path, rng)
    elif kind == "utf8":
        _invalid_utf8_inside(path, docs[-1])
    return path, table.num_rows, kind


def _saved_case(tmp: Path, case: int) -> tuple[Path, int, str]:
    """A damaged save_to_disk folder, the rows written, the damage (the kinds in turn, the rest seeded)."""
    rng = random.Random(case)
    docs = [synthetic_code(rng, lines=rng.randint(1, 40)) for _ in range(rng.randint(1, 60))]
    kind = SAVED_KINDS[case % len(SAVED_KINDS)]
    column = "body" if kind == "wrong_column" else "text"
    path = tmp / "saved"
    rows = [] if kind == "no_rows" else docs
    datasets.Dataset.from_dict({column: rows}, features=datasets.Features({column: datasets.Value("string")})
                               ).save_to_disk(str(path))
    arrow = next(path.glob("*.arrow"), path / "none.arrow")  # no_rows: none written
    if kind == "arrow":
        _flip_or_cut(arrow, rng)
    elif kind == "utf8":
        _invalid_utf8_inside(arrow, docs[-1])
    elif kind == "missing_arrow":
        arrow.unlink()
    elif kind in ("state", "info"):
        f = path / ("state.json" if kind == "state" else "dataset_info.json")
        f.write_text(rng.choice([f.read_text()[: rng.randrange(1, 40)], "{}", "[]", "\xff junk"]))
    elif kind == "info_type":  # the features say int64, the Arrow file holds strings
        info = json.loads((path / "dataset_info.json").read_text())
        info["features"] = {"text": {"dtype": "int64", "_type": "Value"}}
        (path / "dataset_info.json").write_text(json.dumps(info))
    return path, len(rows), kind


@pytest.mark.parametrize("make", [_parquet_case, _saved_case], ids=["parquet", "saved"])
def test_fuzzed_parquet_and_saved_datasets_are_processed_or_refused_naming_the_file(
    make, tok, tmp_path: Path,  # noqa: ANN001
) -> None:
    """24 seeded cases of each: processed, every row accounted for (tokens or a counted skip), or
    refused with a ValueError naming the damaged file or folder, and no token file published."""
    outcomes: dict[str, list[str]] = {"processed": [], "refused": []}
    skips: dict[str, int] = {}
    for case in range(N_CASES):
        case_dir = tmp_path / f"case{case}"
        case_dir.mkdir()
        path, n_rows, kind = make(case_dir, case)
        out = case_dir / "out"
        try:
            src = resolve_source(DataSourceConfig(path=str(path)), index=0)
            s = preprocess_source(src, tokenizer=tok, out_prefix=out, fim_rate=0.1, fim_spm_rate=0.0, seed=case,
                                  num_workers=0, progress=False)
        except ValueError as e:
            assert path.name in str(e), (case, kind, str(e))
            assert "Traceback" not in str(e)
            with pytest.raises(ValueError):  # nothing half-written is loadable
                IndexedTokens(out)
            assert not any(case_dir.glob("out*"))
            assert EXPECTED[kind][0] in (None, "refused"), (case, kind, str(e))
            outcomes["refused"].append(kind)
            continue
        assert EXPECTED[kind][0] in (None, "processed"), (case, kind)
        if EXPECTED[kind][1] is not None:
            assert s.skipped.get(EXPECTED[kind][1], 0) == max(n_rows, 1), (case, kind, s.skipped)
        if kind == "utf8" and make is _saved_case:
            assert s.skipped == {"invalid_utf8": 1}, s.skipped
        data = IndexedTokens(out)
        data.verify()
        assert data.n_docs == s.documents
        assert s.documents + sum(s.skipped.values()) == max(n_rows, 1), (case, kind, s.skipped)  # empty: 1 skip
        for reason, n in s.skipped.items():
            skips[reason] = skips.get(reason, 0) + n
        outcomes["processed"].append(kind)
        shutil.rmtree(case_dir)
    print(f"{make.__name__}: {len(outcomes['processed'])} processed {sorted(outcomes['processed'])}, skips {skips}; "
          f"{len(outcomes['refused'])} refused {sorted(outcomes['refused'])}")
    assert outcomes["processed"] and outcomes["refused"]  # the cases reach both outcomes
