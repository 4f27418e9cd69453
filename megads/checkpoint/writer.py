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
       end of training, wait for it. It is one long-lived thread, not one per save: glibc gives a
       new thread's allocations an arena of their own, and with a thread per save the freed
       buffers of one save were not reused by the next (RSS grew by about 1.5 MiB a save, +7%
       over 2,000 steps with a save every 100, tests/faults/test_soak.py; unchanged with
       MALLOC_ARENA_MAX=1, i.e. fragmentation, not live objects)
An interrupted save leaves only a `.tmp` folder: the previous checkpoint stays the newest. The
next job's writer removes such leftovers when it starts (`remove_stale_tmp`, rank 0 -- the rank
that commits -- only folders named exactly `step_XXXXXXXX.tmp`, before its first save; the
run-folder lock guarantees no other job is writing there).

Resume (`pick_resume`): the newest completed folder whose manifest checks out (sizes, and the
SHA-256 of every file with `verify="checksum"`); each corrupt one on the way is reported and
skipped. An explicitly named folder is verified too, and refused if it is corrupt. A folder named
like a step but without the completion marker (never our own output: the marker is written
before the rename) is named in a warning and ignored.
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megads.checkpoint.dcp import (
    META_FILE,
    CheckpointCorrupt,
    commit_folder,
    completed_steps,
    newest_first,
    save_state,
    staged_copy,
    step_dir_name,
    unmarked_step_folders,
    verify_folder,
)

log = logging.getLogger("megads.checkpoint")


class CheckpointWriteFailed(RuntimeError):
    """A step folder could not be written (disk full, file too large, no permission, ...): its
    partial `.tmp` folder is removed and the previous complete checkpoint stays the latest."""


def _cause(e: BaseException, root: Path) -> str:
    """The underlying error of a failed save, in words a user can act on (DCP wraps each rank's
    error in a CheckpointException; torch.save's zip writer reports a short write -- a full disk,
    a file-size limit -- only as "unexpected pos")."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, wrapped = next(iter(sorted(failures.items())))
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        text = f"rank {rank}: {type(inner).__name__}: {inner}"
    else:
        text = f"{type(e).__name__}: {e}"
    if "unexpected pos" in text:
        text += " -- a write came short: the file system is full or a file-size limit was hit"
    try:
        text += f"; {shutil.disk_usage(root).free / 2**20:,.0f} MiB free there"
    except OSError:
        pass
    return text


_STALE_TMP = re.compile(r"step_\d{8}\.tmp")  # what CheckpointWriter.save writes into; nothing else is removed


def remove_stale_tmp(root: Path, *, say: Callable[[str], None] = log.warning) -> list[str]:
    """Remove the `step_XXXXXXXX.tmp` folders an interrupted save left in `root`; their names.

    Call on one rank (the committing rank 0) before the job's first save. Only real folders
    (not links) whose name matches exactly; anything else in `root` is left alone.
    """
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        if _STALE_TMP.fullmatch(child.name) and child.is_dir() and not child.is_symlink():
            size = sum(p.stat().st_size for p in child.rglob("*") if p.is_file())
            shutil.rmtree(child)
            say(f"removed {child}, the partial folder of an interrupted save ({size / 2**20:.1f} MiB)")
            removed.append(child.name)
    return removed


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
        self._jobs: queue.Queue[Callable[[], None]] | None = None  # the background writer's work
        self._error: BaseException | None = None
        self.blocking_s: list[float] = []  # per save: how long training waited
        self.total_s: list[float] = []  # per save: until the folder was complete
        self.removed_tmp = remove_stale_tmp(self.root) if self.rank == 0 else []

    def save(self, step: int, entries: dict[str, Any], *, meta: dict[str, Any]) -> Path:
        """Write `entries` as step folder `step`; returns its final path (complete once `wait`
        returns, at once when synchronous). CheckpointWriteFailed when a synchronous save cannot
        be written; a failed background save is logged when the next save starts (training goes
        on) and raised by `wait()` only for the last one."""
        try:
            self.wait()
        except CheckpointWriteFailed as e:
            if self.rank == 0:
                log.error(f"{e}; training goes on")
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

        if self._jobs is None:  # started at the first save; a daemon: it never holds up the exit
            self._jobs = queue.Queue()
            threading.Thread(target=self._serve, args=(self._jobs,), name="checkpoint-writer", daemon=True).start()
        self._jobs.put(run)
        return final

    @staticmethod
    def _serve(jobs: queue.Queue[Callable[[], None]]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            finally:
                del job  # its staged copy of the state: freed now, not at the next save
                jobs.task_done()

    def wait(self) -> None:
        """Block until the background save (if any) is complete; raise its error."""
        if self._jobs is not None:
            self._jobs.join()
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointWriteFailed):
                raise err
            raise RuntimeError(f"the background checkpoint save failed: {err}") from err

    def _write(self, tmp: Path, final: Path, entries: dict[str, Any], meta: dict[str, Any], *, group: Any) -> None:
        try:
            save_state(tmp, entries, group=group)  # DCP: a failure on any rank raises on every rank
            commit_folder(tmp, final, meta=meta, group=group)  # agreed over the group, too
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            done = completed_steps(self.root)
            latest = done[-1].name if done else "no earlier checkpoint"
            raise CheckpointWriteFailed(
                f"checkpoint {final.name} could not be written to {self.root} ({_cause(e, self.root)}); its partial folder "
                f"was removed and {latest} stays the latest: free space (or fix the permissions) there"
            ) from e
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
    for odd in unmarked_step_folders(ckpt_dir):
        warn(f"{odd} is named like a checkpoint but has no {META_FILE} (not a folder megads completed: "
             "another tool's, or a damaged one); it is ignored")
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
