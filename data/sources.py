"""Ingestion: resolve configured sources to files and iterate their documents.

A source is a file or a folder. Readers by extension: ``.jsonl``/``.json`` and ``.parquet`` go
through Hugging Face ``datasets`` in streaming mode (constant memory whatever the file size);
folders written by ``Dataset.save_to_disk`` through ``load_from_disk`` (memory-mapped Arrow);
anything else is a plain text file holding ONE document (source code is the main use, and splitting
a program into lines would destroy it). Plain text files are read with our own reader rather than
``datasets``' ``text`` builder because that builder aborts the whole source on one bad byte and
costs a builder per file; here each bad file is a counted skip.

Every record yields a ``RawDoc``: either a text or a skip reason, with a reference
``file:record`` used in the summary, so nothing is dropped without being counted.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megads.data.cache import fingerprint
from megads.data.config import DataSourceConfig

SKIP_REASONS = ("empty_file", "empty_document", "invalid_utf8", "missing_text_field", "not_a_string")
_JSON_EXT = (".jsonl", ".json", ".ndjson")
_PARQUET_EXT = (".parquet",)
_BUILTIN_EXCLUDE = {"site-packages", "dist-packages", "__pycache__"}


class SourceError(ValueError):
    """A user error in a source, already naming the file and what to do."""


@dataclass(frozen=True)
class RawDoc:
    ref: str  # "file:record" (1-based record) for messages and the summary
    text: str | None  # None when skipped
    skip: str | None  # one of SKIP_REASONS
    nbytes: int  # input bytes this record stands for (progress accounting)


@dataclass(frozen=True)
class ResolvedSource:
    name: str
    root: str
    saved: bool  # a save_to_disk folder
    files: tuple[tuple[str, str], ...]  # (absolute path, reader: text | json | parquet)
    text_field: str

    @property
    def total_bytes(self) -> int:
        if self.saved:
            return sum(p.stat().st_size for p in Path(self.root).glob("*.arrow"))
        return sum(os.path.getsize(f) for f, _ in self.files)

    def description(self) -> dict:
        """What the cache key depends on: paths, sizes and modification times, reader, field."""
        items = []
        paths = sorted(str(p) for p in Path(self.root).iterdir()) if self.saved else [f for f, _ in self.files]
        for f in paths:
            st = os.stat(f)
            items.append((os.path.relpath(f, self.root), st.st_size, st.st_mtime_ns))
        return {
            "root": self.root,
            "saved": self.saved,
            "readers": sorted({r for _, r in self.files}),
            "text_field": self.text_field,
            "files": fingerprint(items),
            "count": len(items),
        }


def _reader_for(path: Path, fmt: str) -> str:
    if fmt in ("jsonl", "json"):
        return "json"
    if fmt in ("text", "parquet"):
        return fmt
    name = path.name.lower()
    if name.endswith(_JSON_EXT):
        return "json"
    if name.endswith(_PARQUET_EXT):
        return "parquet"
    return "text"


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def resolve_source(src: DataSourceConfig, *, index: int) -> ResolvedSource:
    """Files of ``data.sources[index]``; ``ValueError`` when the path is missing or yields nothing."""
    where = f"data.sources[{index}]"
    root = Path(src.path).expanduser()
    if not root.exists():
        raise ValueError(f"{where}.path={src.path}: no such file or folder; fix the path")
    root = root.resolve()
    if root.is_dir() and (src.format == "saved" or (src.format == "auto" and _is_saved_dataset(root))):
        if not _is_saved_dataset(root):
            raise ValueError(f"{where}.path={src.path}: not a save_to_disk folder (no state.json)")
        return ResolvedSource(root.name, str(root), True, (), src.text_field)
    if root.is_file():
        files = [root]
    else:
        files = sorted(
            p
            for p in root.glob(src.glob)
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            raise ValueError(
                f"{where}.path={src.path}: folder has no files matching glob {src.glob!r}; "
                "fix data.sources[].glob or the path"
            )
    return ResolvedSource(
        root.name, str(root), False, tuple((str(p), _reader_for(p, src.format)) for p in files), src.text_field
    )


def builtin_stdlib_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _BUILTIN_EXCLUDE and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files)


def builtin_source() -> ResolvedSource:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = tuple((str(p), "text") for p in builtin_stdlib_files())
    if not files:
        raise ValueError(f"no .py files under the stdlib folder {root}: set data.sources explicitly")
    return ResolvedSource(f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}", str(root), False, files, "text")


def builtin_corpus_description() -> dict:
    src = builtin_source()
    return {"python": sys.version.split()[0], **src.description(), "files": len(src.files)}


def iter_builtin_texts() -> Iterator[str]:
    """Decodable, non-blank texts of the built-in corpus (tokenizer training)."""
    for doc in iter_documents(builtin_source()):
        if doc.text is not None:
            yield doc.text


def _check_text(value: object, ref: str, nbytes: int) -> RawDoc:
    if value is None:
        return RawDoc(ref, None, "missing_text_field", nbytes)
    if not isinstance(value, str):
        return RawDoc(ref, None, "not_a_string", nbytes)
    if not value or value.isspace():
        return RawDoc(ref, None, "empty_document", nbytes)
    return RawDoc(ref, value, None, nbytes)


def _iter_text_file(path: str) -> Iterator[RawDoc]:
    with open(path, "rb") as f:
        raw = f.read()
    if not raw:
        yield RawDoc(f"{path}:1", None, "empty_file", 0)
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        yield RawDoc(f"{path}:byte {err.start}", None, "invalid_utf8", len(raw))
        return
    yield _check_text(text, f"{path}:1", len(raw))


def _parquet_rows(path: str) -> int:
    """Rows of a parquet file from its footer; SourceError naming the file when it has none."""
    import pyarrow.parquet as pq

    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except Exception as err:  # a truncated file has no footer: pyarrow's error would not name it
        raise SourceError(
            f"{path}: not a readable parquet file ({type(err).__name__}: {err}); a truncated or altered copy? "
            "Replace it, or set data.sources[].format if it is not parquet"
        ) from err


def _iter_records(path: str, reader: str, field: str) -> Iterator[RawDoc]:
    import datasets

    size = os.path.getsize(path)
    if size == 0 or (reader == "parquet" and _parquet_rows(path) == 0):
        yield RawDoc(f"{path}:1", None, "empty_file", size)
        return
    try:
        ds = datasets.load_dataset(reader, data_files=[path], split="train", streaming=True)
        records = iter(ds)
        first = True
        i = 0
        for i, rec in enumerate(records, start=1):
            if first and field not in rec:
                raise SourceError(
                    f"{path}: record {i} has no field {field!r} (fields: {', '.join(map(str, rec))}); "
                    "set data.sources[].text_field to the field holding the text"
                )
            first = False
            value = rec.get(field)
            n = len(value) if isinstance(value, str) else 1
            yield _check_text(value, f"{path}:{i}", n)
        if i == 0:
            yield RawDoc(f"{path}:1", None, "empty_file", size)
    except SourceError:
        raise
    except Exception as err:  # pyarrow / json / decoding errors: name the file and what to do
        what = "a complete parquet file (a truncated or altered copy?)" if reader == "parquet" else "valid UTF-8 JSON lines"
        raise SourceError(
            f"{path}: could not be read as {reader} ({type(err).__name__}: {err}); check that it is {what} "
            "or set data.sources[].format"
        ) from err


def _saved_files(root: Path) -> list[Path]:
    """The .arrow files a save_to_disk folder's state.json lists, each present; SourceError naming
    state.json, dataset_info.json or the missing file otherwise."""
    state_path, info_path = root / "state.json", root / "dataset_info.json"
    try:
        files = [root / str(f["filename"]) for f in json.loads(state_path.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SourceError(f"{state_path}: unreadable save_to_disk state ({type(err).__name__}: {err}); "
                          "save the dataset again (Dataset.save_to_disk)") from err
    try:
        json.loads(info_path.read_text())
    except (OSError, ValueError) as err:
        raise SourceError(f"{info_path}: unreadable ({type(err).__name__}: {err}); save the dataset again") from err
    for f in files:
        if not f.is_file():
            raise SourceError(f"{f}: listed in {state_path} but missing; save the dataset again")
    return files


def _saved_error(root: Path, files: list[Path], err: Exception) -> SourceError:
    """A failed load of a save_to_disk folder, naming the first .arrow file that does not read."""
    import pyarrow as pa

    for f in files:
        try:
            with pa.memory_map(str(f)) as m:
                pa.ipc.open_stream(m).read_all().validate(full=False)
        except Exception as bad:
            return SourceError(f"{f}: not a readable Arrow file ({type(bad).__name__}: {bad}); a truncated or "
                               "altered copy? Save the dataset again")
    text = str(err) if len(str(err)) <= 300 else str(err)[:300] + " ..."  # pyarrow may quote a whole record
    return SourceError(f"{root}: could not be loaded as a save_to_disk folder ({type(err).__name__}: {text}); "
                       f"its .arrow files read, so {root / 'dataset_info.json'} (the features) does not match them?")


def _iter_saved(root: str, field: str) -> Iterator[RawDoc]:
    """Records of a save_to_disk folder. Text is read as Arrow bytes and decoded here, so invalid
    UTF-8 is a counted skip of its record (as for the other readers); every Arrow array is
    validated (offsets in bounds) before it is read. Arrow files carry no checksum: a byte altered
    inside a text reads as altered text."""
    import datasets
    import pyarrow as pa

    files = _saved_files(Path(root))
    if not files:  # save_to_disk of no rows writes no .arrow file (and load_from_disk fails on it)
        yield RawDoc(f"{root}:1", None, "empty_file", 0)
        return
    try:
        ds = datasets.load_from_disk(root)
    except Exception as err:
        raise _saved_error(Path(root), files, err) from err
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{root}: DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    if field not in ds.column_names:
        raise ValueError(
            f"{root}: no column {field!r} (columns: {', '.join(ds.column_names)}); "
            "set data.sources[].text_field"
        )
    i = 0
    batches = ds.select_columns([field]).with_format("arrow").iter(batch_size=1024)
    while True:
        try:
            table = next(batches)
            column = table.column(field)
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = column.cast(pa.large_binary())  # zero-copy: no UTF-8 check yet
            column.validate(full=True)
            values = column.to_pylist()
        except StopIteration:
            break
        except Exception as err:
            raise _saved_error(Path(root), files, err) from err
        for value in values:
            i += 1
            ref = f"{root}:{i}"
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    yield RawDoc(ref, None, "invalid_utf8", len(value))
                    continue
            yield _check_text(value, ref, len(value) if isinstance(value, str) else 1)
    if i == 0:
        yield RawDoc(f"{root}:1", None, "empty_file", 0)


def iter_documents(src: ResolvedSource) -> Iterator[RawDoc]:
    """Every record of the source in a fixed order, texts and counted skips alike."""
    if src.saved:
        yield from _iter_saved(src.root, src.text_field)
        return
    for path, reader in src.files:
        if reader == "text":
            yield from _iter_text_file(path)
        else:
            yield from _iter_records(path, reader, src.text_field)
