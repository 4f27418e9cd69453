"""Atomic folder writes for exported checkpoints.

`atomic_folder(dst, overwrite=...)` yields a temporary folder beside `dst`; when the block
finishes, its files replace `dst` in one rename (new folder) or file by file with `os.replace`
(existing folder: stale `model*` files of an earlier export are removed first, nothing else
is touched). On any error the temporary folder is deleted and `dst` is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(dst: Path, *, overwrite: bool, error: type[Exception] = ValueError) -> Iterator[Path]:
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise error(f"{dst}: exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            written = {f.name for f in tmp.iterdir()}
            for old in dst.iterdir():
                if old.name.startswith("model") and old.name not in written:
                    old.unlink()
            for f in tmp.iterdir():
                os.replace(f, dst / f.name)
            tmp.rmdir()
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
