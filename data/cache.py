"""Cache helpers: an inter-process build lock, atomic folder publication and fingerprints.

Every cached artefact (a tokenizer folder, a token-file folder) is built in a private temporary
folder next to its final place and published with one ``os.rename``; a folder therefore either
exists complete or not at all, whatever happens to the builder. Several ranks of one job that ask
for the same artefact take an exclusive ``fcntl.flock`` on ``<final>.lock``: the first builds, the
others wait and then find the folder. Without working locks (some network file systems) the rename
still keeps it correct: a second builder sees the folder published and discards its own copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def resolve_cache_dir(cache_dir: str) -> Path:
    """Absolute cache folder; a relative one is taken from the launch directory (Hydra-aware)."""
    path = Path(cache_dir).expanduser()
    if path.is_absolute():
        return path
    base = Path.cwd()
    try:  # under Hydra with job.chdir the cwd is the run folder: use the original one
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            base = Path(HydraConfig.get().runtime.cwd)
    except ImportError:
        pass
    return (base / path).resolve()


def fingerprint(obj: object, *, length: int = 16) -> str:
    """Stable hex digest of a JSON-serialisable description."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def build_lock(final: Path, *, announce: Callable[[str], None] = print) -> Iterator[None]:
    """Hold an exclusive lock for building ``final``; says so every 30 s while waiting."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.with_name(final.name + ".lock")
    with open(lock_path, "a+") as fh:
        start = time.monotonic()
        last = start
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                now = time.monotonic()
                if now - last >= 30:
                    announce(f"waiting for another process building {final} ({now - start:.0f} s)")
                    last = now
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def publish_folder(build: Callable[[Path], None], *, final: Path) -> bool:
    """Run ``build(tmp_dir)`` and rename ``tmp_dir`` to ``final``; False if another copy won."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        _fsync_dir(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if final.is_dir():
                return False
            raise
        _fsync_dir(final.parent)
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, *, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
