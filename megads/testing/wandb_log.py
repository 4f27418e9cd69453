"""Read a wandb run's transaction log (`run-<id>.wandb`) back: records as wandb's own protobufs.

wandb writes everything a run logs (run record, config, history rows, summary, files) to one
append-only file per run folder, the file `wandb sync` uploads. Since the service moved to
wandb-core (Go), the Python package no longer ships a reader of it (wandb.sdk.internal.datastore
is gone in 0.2x), but it still ships the record schema (`wandb.proto.wandb_internal_pb2.Record`).
The container is LevelDB's log format: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each `crc32 (4) | length (2, little-endian) | type (1) | data`, a record
being one FULL chunk or FIRST, MIDDLE..., LAST. This module parses that container (checking
every chunk's CRC) and decodes the records with wandb's schema, so the tests assert on what
wandb itself would upload.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[tuple[int, bytes]]:
    if data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise ValueError("not a wandb transaction log (no :W&B header)")
    pos = HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the rest of a block too small for a header is padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left_in_block  # zero padding up to the block end
            continue
        body = data[pos + HEADER:pos + HEADER + length]
        if len(body) < length:
            return  # a chunk cut short: the writer was killed mid-write
        if zlib.crc32(body, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"bad CRC in the chunk at byte {pos}")
        yield kind, body
        pos += HEADER + length


def read_records(path: Path) -> list[Any]:
    """Every complete record of the transaction log `path`, as `wandb_internal_pb2.Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    records, parts = [], []
    for kind, body in _chunks(Path(path).read_bytes()):
        if kind == FULL:
            parts = [body]
        elif kind == FIRST:
            parts = [body]
            continue
        elif kind == MIDDLE:
            parts.append(body)
            continue
        else:  # LAST
            parts.append(body)
        rec = pb.Record()
        rec.ParseFromString(b"".join(parts))
        records.append(rec)
        parts = []
    return records


def history_rows(records: list[Any]) -> list[dict[str, Any]]:
    """The history rows (`wandb.log` calls) of `records`, values decoded from their JSON."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


def run_record(records: list[Any]) -> Any:
    """The run record (id, group, name, tags, config) of `records`."""
    for r in records:
        if r.WhichOneof("record_type") == "run":
            return r.run
    raise ValueError("no run record in the log")


def logged_files(records: list[Any]) -> list[str]:
    """The paths of the files the run saved (media files of logged images among them)."""
    return [f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files]
