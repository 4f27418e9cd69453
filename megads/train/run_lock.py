"""One launch per run folder, and no worker outliving its launcher.

Two problems this module solves (issue 9, defect 12):

* two launches on one `run_dir` both train and both write checkpoints and metrics into it;
* `kill -9` of `torchrun` alone leaves its workers running: torchrun starts every worker in a
  session of its own (`start_new_session=True`), so the signal reaches nobody else, and the
  workers, whose gloo/NCCL groups no longer need the agent, go on training and checkpointing.

`RunFolderLock`
---------------
An exclusive lock on `<run_dir>/.megads.lock`, taken before any process group starts and held
until the run ends. **Only global rank 0 of a launch takes it**; the other ranks of the launch
enter the context as a no-op and trust rank 0. A second launch is thereby refused by its own
rank 0, before that rank writes anything; the second launch's other ranks wait in
`init_process_group` for a rank 0 that never comes, and are torn down by their launcher
(torchrun stops the whole worker group when one worker fails; the Slurm script runs
`srun --kill-on-bad-exit=1`). Ranks of one launch can therefore never refuse each other, and no
launch id has to be compared.

Taking the lock (rank 0):

1. the holder record is written to a private file `.megads.lock.<host>.<pid>.<nonce>.tmp` and
   hard-linked to `.megads.lock` (`link(2)` fails when the name exists, atomically, on local
   disks and on NFS; a lost NFS reply is recognised by the private file's link count reaching
   2, as `open(2)` recommends). The lock therefore appears complete or not at all. Where hard
   links are not supported the file is made with `O_CREAT | O_EXCL` instead;
2. the lock file is then `flock`ed (`LOCK_EX`) for as long as it is held, where the file system
   supports it (local disks; NFS, where Linux maps it to a POSIX lock of the NFS server; Lustre
   mounted with `-o flock`);
3. when `.megads.lock` already exists, its record (JSON: host, pid, launcher pid, start time,
   job ids, ...) is read and judged:

   * the file is `flock`ed by someone  -> held by a live process (also across containers that
     share a host name and across hosts on a coherent shared file system): refused;
   * same host (and same boot): the holder pid is alive, is no zombie and, on Linux, started at
     the recorded time (so a recycled pid is not mistaken for the holder) -> refused;
     otherwise -> **stale**: taken over, with a warning naming the dead holder;
   * another host -> its pid cannot be checked from here: refused, the message says so and
     how to remove the file. One exception: the holder is an earlier run of the same Slurm
     job (same `SLURM_JOB_ID`, smaller `SLURM_RESTART_COUNT`), i.e. a requeued job that
     landed on other nodes; Slurm only restarts a job once the previous run has ended, so the
     lock is stale.

   A stale lock is taken over by renaming it to a private name (atomic: of two contenders one
   wins), checking that what was moved is the record judged stale (else it is put back), and
   starting again from step 1.

The refusal (`RunFolderLockedError`) names the holder's host and pid, its launcher pid, job id
and start time, the lock file, and the fixes: wait for that run, pick another `run_dir`, or
delete the file if the holder is gone.

Release: the file is removed (only if it still holds this lock's record) when the context
exits, normally or by an exception; at interpreter exit (`atexit`, for `acquire()` without
`with`: `sys.exit`, an uncaught exception); on SIGTERM (a handler is installed while the lock is held,
from the main thread, chained to the previous one); and by `exit_when_launcher_dies`' watcher
before it ends the process. `kill -9` of the holder leaves the file behind: the next launch on
the same host takes it over; on another host it is refused until the file is deleted (or the
job is the requeued Slurm job above).

`exit_when_launcher_dies`
-------------------------
Called early in every worker. For a worker started by torchrun (`TORCHELASTIC_RUN_ID` set; its
parent is the torchrun process, whose main thread starts the workers):

* Linux: `prctl(PR_SET_PDEATHSIG, SIGTERM)`, so the kernel sends SIGTERM the moment the parent
  dies; then `os.getppid()` is compared with the parent read before the call, and a parent that
  already died (between the fork and the call) ends the worker at once;
* everywhere: a daemon thread compares `os.getppid()` with that parent every `poll_s` seconds
  and, when it changed, releases the run-folder locks of the process, writes one line to
  stderr and calls `os._exit(143)`. It also catches what SIGTERM cannot: a Python handler (the
  lock's) does not run while the main thread is blocked in a collective, the thread does.

Under `srun` without torchrun (`launch/slurm.sbatch`), the parent is `slurmstepd`: nothing is
armed. slurmstepd ends its tasks itself (SIGTERM, SIGKILL after `KillWait`) when the step ends
(scancel, time limit, `--kill-on-bad-exit`), and the step's cgroup takes what is left; end a
Slurm run with `scancel`, not by killing the `srun` client. A plain single-process run (no
launcher variables) is not affected either.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

try:  # not on Windows
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("megads.train")

LOCK_NAME = ".megads.lock"
EXIT_STATUS_LAUNCHER_GONE = 128 + signal.SIGTERM  # as if the launcher's SIGTERM had ended us
_PR_SET_PDEATHSIG = 1
_ATTEMPTS = 5


class RunFolderLockedError(RuntimeError):
    """The run folder is locked by another launch (the message names the holder and the fix)."""


# --------------------------------------------------------------------------- who is this process


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None where there is no /proc entry."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_ticks(pid: int) -> int | None:
    """The process start time in clock ticks since boot (Linux), None where unknown."""
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _pid_alive(pid: int, *, start_ticks: int | None) -> bool:
    """Whether `pid` on this host is a live process that started at `start_ticks` (when known)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    fields = _proc_stat(pid)
    if fields is None:
        return True  # no /proc (macOS): kill(0) is all we know
    if fields[0] in ("Z", "X"):
        return False  # dead, not yet reaped by its parent
    return start_ticks is None or int(fields[19]) == start_ticks


def _job_id() -> str | None:
    rdzv = os.environ.get("TORCHELASTIC_RUN_ID")  # "none" unless torchrun got --rdzv-id / --standalone
    return os.environ.get("SLURM_JOB_ID") or (rdzv if rdzv and rdzv != "none" else None)


# --------------------------------------------------------------------------- the holder record


@dataclass(frozen=True)
class LockHolder:
    """What `.megads.lock` says about the process holding it (every field but host/pid optional)."""

    host: str
    pid: int
    token: str = ""
    launcher_pid: int | None = None
    started: str = ""
    job_id: str | None = None
    slurm_job_id: str | None = None
    slurm_restart_count: int = 0
    boot_id: str | None = None
    pid_start_ticks: int | None = None
    flock: bool = False
    command: str = ""

    @classmethod
    def for_this_process(cls, *, flock: bool) -> LockHolder:
        return cls(
            host=socket.gethostname(), pid=os.getpid(), token=uuid.uuid4().hex, launcher_pid=os.getppid(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), job_id=_job_id(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            boot_id=_boot_id(), pid_start_ticks=_start_ticks(os.getpid()), flock=flock,
            command=" ".join(sys.argv)[:300],
        )

    @classmethod
    def from_json(cls, text: str) -> LockHolder:
        """Parse a record; ValueError when it is not one (empty, truncated, foreign)."""
        d = json.loads(text)
        if not isinstance(d, dict) or not isinstance(d.get("host"), str) or not isinstance(d.get("pid"), int):
            raise ValueError("not a megads lock record")
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=1) + "\n"

    def describe(self) -> str:
        parts = [f"host {self.host}", f"pid {self.pid}"]
        if self.launcher_pid:
            parts.append(f"launcher pid {self.launcher_pid}")
        if self.job_id:
            parts.append(f"job {self.job_id}")
        if self.started:
            parts.append(f"started {self.started}")
        return ", ".join(parts)


def _read_holder(path: Path) -> LockHolder | str | None:
    """The record at `path`; None when the file is gone; the raw text when it is no record."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return LockHolder.from_json(text)
    except ValueError:
        return text


def _flock_busy(path: Path) -> bool | None:
    """Whether some process holds an flock on `path` (None: cannot tell on this file system)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return None  # ENOLCK / EOPNOTSUPP: no flock here
    else:
        return False
    finally:
        os.close(fd)  # also drops the probe's lock


# --------------------------------------------------------------------------- the lock

_held_locks: set[RunFolderLock] = set()  # the locks this process holds (released by the watcher)


def _forget_locks_in_child() -> None:
    # a forked child (e.g. a DataLoader worker) does not hold the lock: it must neither keep the
    # flock alive after rank 0 dies nor remove the file when it exits
    for lock in list(_held_locks):
        lock._forget()
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _release_all_locks() -> None:
    for lock in list(_held_locks):
        with contextlib.suppress(Exception):
            lock.release()


class RunFolderLock:
    """Exclusive lock on `<run_dir>/.megads.lock` for one launch (see the module docstring).

        with RunFolderLock(run_dir, rank=env.rank):   # before init_process_group
            ...                                       # the whole run

    Only `rank == 0` takes the lock; other ranks get a no-op context. `acquire()` creates
    `run_dir` when missing and raises `RunFolderLockedError` when another live launch holds it.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, rank: int = 0, handle_sigterm: bool = True) -> None:
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_NAME
        self.rank = rank
        self.handle_sigterm = handle_sigterm
        self.holder: LockHolder | None = None  # our record while held
        self._fd: int | None = None
        self._prev_sigterm: Any = None
        self._our_handler: Any = None

    @property
    def held(self) -> bool:
        return self.holder is not None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- taking

    def acquire(self) -> RunFolderLock:
        """Take the lock (rank 0) or do nothing (other ranks); returns self."""
        if self.rank != 0 or self.held:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_ATTEMPTS):
            if self._try_create():
                self._install_sigterm()
                atexit.register(self.release)  # also on sys.exit / an uncaught exception without `with`
                _held_locks.add(self)
                return self
            found = self._read_settled()
            if found is None:
                continue  # released meanwhile: try again
            if isinstance(found, str):
                raise RunFolderLockedError(self._refusal_unreadable(found))
            verdict, why = self._judge(found)
            if verdict != "stale":
                raise RunFolderLockedError(self._refusal(found, why, checked=verdict == "live"))
            log.warning("megads: taking over the stale run-folder lock %s (%s: %s)", self.path, found.describe(), why)
            self._break(found)
        raise RunFolderLockedError(
            f"could not take the run-folder lock {self.path} after {_ATTEMPTS} attempts: other launches keep "
            "taking it; start one launch per run_dir"
        )

    def _try_create(self) -> bool:
        """Make `.megads.lock` holding our record, atomically; False when it already exists."""
        if os.path.lexists(self.path):
            return False  # judge it without writing anything into the folder
        tmp = self.run_dir / f"{LOCK_NAME}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            can_flock = False
            if fcntl is not None:  # does this file system do flock? (tried on our private file)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    can_flock = True
                except OSError:
                    pass
            holder = LockHolder.for_this_process(flock=can_flock)
            os.write(fd, holder.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                if os.stat(tmp).st_nlink != 2:  # 2: the link was made, only the NFS reply was lost
                    return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS):
                    raise
                return self._try_create_excl(holder)  # no hard links here
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        self._hold(holder)
        return True

    def _try_create_excl(self, holder: LockHolder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, holder.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._hold(holder)
        return True

    def _hold(self, holder: LockHolder) -> None:
        self.holder = holder
        self._fd = os.open(self.path, os.O_RDWR)
        if holder.flock and fcntl is not None:
            for _ in range(20):  # a contender's probe may hold it for an instant; the file is ours
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.02)
                except OSError:
                    break

    def _read_settled(self) -> LockHolder | str | None:
        """The existing record; a file that is not one yet (being written) gets 2 s to become one."""
        found = _read_holder(self.path)
        deadline = time.monotonic() + 2.0
        while isinstance(found, str) and time.monotonic() < deadline:
            time.sleep(0.1)
            found = _read_holder(self.path)
        return found

    def _judge(self, found: LockHolder) -> tuple[str, str]:
        """('live' | 'stale' | 'unknown', why) for the holder `found`."""
        here = found.host == socket.gethostname()
        if here and _pid_alive(found.pid, start_ticks=found.pid_start_ticks):
            return "live", f"pid {found.pid} is alive on this host"
        if _flock_busy(self.path):
            return "live", "its lock file is flock-ed by a live process (its pid may not be visible from here)"
        if here:
            boot = _boot_id()
            if found.boot_id and boot and found.boot_id != boot:
                return "stale", "this host was rebooted since"
            return "stale", f"pid {found.pid} is no longer running on this host"
        slurm_job, restarts = os.environ.get("SLURM_JOB_ID"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        if slurm_job and found.slurm_job_id == slurm_job and found.slurm_restart_count < restarts:
            return "stale", (f"an earlier run (restart {found.slurm_restart_count}) of this requeued Slurm job "
                             f"{slurm_job}, now at restart {restarts}")
        return "unknown", (f"it runs on another host ({found.host}): whether pid {found.pid} is still alive cannot "
                           f"be checked from {socket.gethostname()}")

    def _break(self, stale: LockHolder) -> None:
        """Remove the stale lock `stale`, unless someone replaced it meanwhile (then put theirs back)."""
        grave = self.run_dir / f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # another contender removed it first
        moved = _read_holder(grave)
        if not isinstance(moved, LockHolder) or moved.token != stale.token or moved.pid != stale.pid:
            try:  # we moved a fresh lock another launch just took: give it back
                os.link(grave, self.path)
            except FileExistsError:
                log.warning("megads: the run-folder lock %s changed hands while a stale one was removed", self.path)
        os.unlink(grave)

    def _refusal(self, found: LockHolder, why: str, *, checked: bool) -> str:
        head = (f"the run folder {self.run_dir} is in use by another launch ({found.describe()}): {why}. "
                f"Lock file: {self.path}.")
        if checked:
            fix = " Wait for that run to end (or stop it), or choose another run_dir for this launch."
        else:
            fix = (f" If that run is still going, wait for it or choose another run_dir; if it is gone (check on "
                   f"{found.host}: `ps -p {found.pid}`, or the job {found.job_id or '?'} in squeue), delete the "
                   f"lock file: rm {self.path}")
        return head + fix

    def _refusal_unreadable(self, text: str) -> str:
        return (f"the run folder {self.run_dir} holds a lock file that is not a megads lock record ({text[:80]!r}): "
                f"{self.path}. If no launch is using this folder, delete it (rm {self.path}); otherwise choose "
                "another run_dir.")

    # ---- releasing

    def release(self) -> None:
        """Remove the lock file if it still holds our record; idempotent; no-op when not held."""
        holder, self.holder = self.holder, None
        _held_locks.discard(self)
        if holder is None:
            return
        atexit.unregister(self.release)
        found = _read_holder(self.path)
        if isinstance(found, LockHolder) and found.token == holder.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            log.warning("megads: the run-folder lock %s no longer holds this process' record; left as it is", self.path)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._restore_sigterm()

    def _forget(self) -> None:
        """In a forked child: drop our copy of the lock without touching the file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self.holder = None, None

    def _install_sigterm(self) -> None:
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        prev = signal.getsignal(signal.SIGTERM)
        if prev == signal.SIG_IGN:
            return  # SIGTERM does not end this process: nothing to clean up for it

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self.release()  # also puts `prev` back
            if callable(prev):
                prev(signum, frame)
            else:  # SIG_DFL (or a handler set outside Python): die of the signal as before
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        self._prev_sigterm, self._our_handler = prev, on_sigterm
        signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm(self) -> None:
        handler, self._our_handler = self._our_handler, None
        if handler is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is handler:  # not if someone installed another one since
            signal.signal(signal.SIGTERM, self._prev_sigterm if self._prev_sigterm is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------- launcher death

_watcher: threading.Thread | None = None


def _looks_like_torchrun(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"torchrun" in cmd or b"torch.distributed.run" in cmd or b"torch/distributed/run" in cmd


def _launcher_gone(parent: int, why: str) -> None:
    print(f"megads: the launcher (pid {parent}) of worker pid {os.getpid()} (rank {os.environ.get('RANK', '?')}) "
          f"is gone ({why}); exiting so that no orphaned worker goes on training or writing checkpoints",
          file=sys.stderr, flush=True)
    _release_all_locks()
    os._exit(EXIT_STATUS_LAUNCHER_GONE)


def _set_pdeathsig(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_when_launcher_dies(
    *, parent_pid: int | None = None, use_prctl: bool = True, poll_s: float | None = 1.0,
    signum: int = signal.SIGTERM,
) -> bool:
    """Make this torchrun worker end when its launcher dies; True when armed (see module docstring).

    No effect (False) unless `TORCHELASTIC_RUN_ID` is set (a plain run, or srun without
    torchrun). `parent_pid` is the launcher's pid when known; by default the current parent.
    `use_prctl` arms Linux' parent-death signal `signum`; `poll_s` (None: off) is the period of
    the portable watcher thread. Call it as early as possible in the worker.
    """
    global _watcher
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    parent = parent_pid if parent_pid is not None else os.getppid()
    if os.getppid() != parent:
        _launcher_gone(parent, f"this worker's parent is now pid {os.getppid()}")
    if parent == 1 and not _looks_like_torchrun(1):
        _launcher_gone(parent, "this worker was re-parented to init before it could watch its launcher")
    if use_prctl and sys.platform.startswith("linux"):
        if not _set_pdeathsig(signum):
            log.warning("megads: prctl(PR_SET_PDEATHSIG) failed; relying on the launcher watcher thread only")
        if os.getppid() != parent:  # died between the fork (or the read above) and the prctl
            _launcher_gone(parent, "it died before the parent-death signal was armed")
    if poll_s is not None and (_watcher is None or not _watcher.is_alive()):
        period = float(poll_s)

        def watch() -> None:
            while True:
                time.sleep(period)
                now = os.getppid()
                if now != parent:
                    _launcher_gone(parent, f"this worker's parent is now pid {now}")

        _watcher = threading.Thread(target=watch, name="megads-launcher-watch", daemon=True)
        _watcher.start()
    return True
