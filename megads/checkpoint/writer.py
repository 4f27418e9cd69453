"""Saving step folders during training (synchronous or in the background) and choosing the one to
resume from (the newest intact one, falling back past a corrupt one).

Save (`CheckpointWriter.save`, collective):
    1. rank 0 clears `<dir>/step_XXXXXXXX.tmp`; barrier
    2. synchronous: DCP writes the entries into it, `commit_folder` hashes, writes manifest.json
       and meta.json (the completion marker) and renames it to `step_XXXXXXXX`; rank 0 prunes
       all but the newest `keep_last` *completed* folders
       asynchronous (`checkpoint.async_save`): the entries are copied to CPU memory (the only
       part training waits for) and a background thread does 2. over a process group of its
       own, so its collectives never interleave with the training step's; the next save, and the
       end of training, wait for it
An interrupted save leaves only a `.tmp` folder: the previous checkpoint stays the newest.

Resume (`pick_resume`): the newest completed folder whose manifest checks out (sizes, and the
SHA-256 of every file with `verify="checksum"`); each corrupt one on the way is reported and
skipped. An explicitly named folder is verified too, and refused if it is corrupt.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megads.checkpoint.dcp import (
    CheckpointCorrupt,
    commit_folder,
    completed_steps,
    newest_first,
    save_state,
    staged_copy,
    step_dir_name,
    verify_folder,
)

log = logging.getLogger("megads.checkpoint")


class CheckpointWriter:
    """Writes step folders under `root`; every rank of the job calls `save` and `wait`."""

    def __init__(self, root: Path, *, keep_last: int, async_save: bool = False, timeout_s: float | None = None) -> None:
        import datetime

        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # collective (every rank creates it): the background thread's own group
        kw = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
        self._group = dist.new_group(backend="gloo", **kw) if async_save and dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.blocking_s: list[float] = []  # per save: how long training waited
        self.total_s: list[float] = []  # per save: until the folder was complete

    def save(self, step: int, entries: dict[str, Any], *, meta: dict[str, Any]) -> Path:
        """Write `entries` as step folder `step`; returns its final path (complete once `wait`
        returns, at once when synchronous)."""
        self.wait()
        t0 = time.perf_counter()
        final = self.root / step_dir_name(step)
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)  # what an interrupted save of this step left
            tmp.mkdir(parents=True)
        if dist.is_initialized():
            dist.barrier()
        if not self.async_save:
            self._write(tmp, final, entries, meta, group=None)
            self.blocking_s.append(time.perf_counter() - t0)
            self.total_s.append(self.blocking_s[-1])
            return final
        staged = staged_copy(entries)
        self.blocking_s.append(time.perf_counter() - t0)

        def run() -> None:
            try:
                self._write(tmp, final, staged, meta, group=self._group)
                self.total_s.append(time.perf_counter() - t0)
            except BaseException as e:  # re-raised by wait() on the training thread
                self._error = e

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=True)
        self._thread.start()
        return final

    def wait(self) -> None:
        """Block until the background save (if any) is complete; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the background checkpoint save failed: {err}") from err

    def _write(self, tmp: Path, final: Path, entries: dict[str, Any], meta: dict[str, Any], *, group: Any) -> None:
        save_state(tmp, entries, group=group)
        commit_folder(tmp, final, meta=meta, group=group)
        if self.rank == 0 and self.keep_last > 0:
            for old in completed_steps(self.root)[: -self.keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)


def pick_resume(
    ckpt_dir: Path, *, explicit: Path | None = None, verify: str = "checksum",
    warn: Callable[[str], None] = log.warning,
) -> Path | None:
    """The step folder to resume from (see the module docstring); None when there is none.

    Raises CheckpointCorrupt when `explicit` is corrupt, or when folders exist but none is intact
    (starting afresh beside them would silently throw the run away).
    """
    checksums = verify == "checksum"
    if explicit is not None:
        verify_folder(explicit, checksums=checksums)
        return explicit
    skipped: list[str] = []
    for folder in newest_first(ckpt_dir):
        try:
            verify_folder(folder, checksums=checksums)
        except CheckpointCorrupt as e:
            warn(f"checkpoint {folder.name} is corrupt and is skipped: {e}")
            skipped.append(folder.name)
            continue
        if skipped:
            warn(f"resuming from the previous complete checkpoint {folder.name} instead of {', '.join(skipped)}")
        return folder
    if skipped:
        raise CheckpointCorrupt(
            f"{ckpt_dir}: every checkpoint is corrupt ({', '.join(skipped)}); repair or remove them, or "
            "start a new run_dir"
        )
    return None
