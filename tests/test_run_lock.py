"""megads.train.run_lock with real processes: one launch per run folder, no orphaned workers.

Lock: a holder process takes the lock and writes a file; a second process is refused (message
with the holder's host and pid) before it writes anything; after the holder exits the file is
gone and a third process gets the lock; stale locks (dead pid, requeued Slurm job) are taken
over, live ones (pid alive, flock held, another host) are not; SIGTERM and exceptions release.

Launcher death: a real launcher process (and real torchrun) is killed with SIGKILL; its workers
must be gone within a few seconds, by each mechanism alone (parent-death signal, watcher thread).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megads.train.run_lock import LOCK_NAME, RunFolderLock, RunFolderLockedError

REPO = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
for _k in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_RESTART_COUNT", "RANK", "LOCAL_RANK"):
    ENV.pop(_k, None)

# takes the lock, writes weights.txt, holds the lock until stdin closes
HOLDER = """
import sys, pathlib
from megads.train.run_lock import RunFolderLock
run_dir = pathlib.Path(sys.argv[1])
with RunFolderLock(run_dir):
    (run_dir / "weights.txt").write_text(sys.argv[2])
    sys.stdin.read()
"""


def _wait_for(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - t0


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that is not us counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _start_holder(run_dir: Path, content: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), content], stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=ENV, text=True)
    _wait_for(lambda: (run_dir / "weights.txt").is_file() or p.poll() is not None, 30, "the holder")
    assert p.poll() is None, p.stderr.read() if p.stderr else ""
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- lock


def test_second_launch_refused_first_untouched_then_free(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = _start_holder(run_dir, "first")
    try:
        lock_bytes = (run_dir / LOCK_NAME).read_bytes()
        record = json.loads(lock_bytes)
        assert record["pid"] == first.pid and record["host"] == socket.gethostname()
        second = subprocess.run([sys.executable, "-c", HOLDER, str(run_dir), "second"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, env=ENV, timeout=60)
        assert second.returncode != 0
        assert "RunFolderLockedError" in second.stderr
        assert f"host {socket.gethostname()}" in second.stderr and f"pid {first.pid}" in second.stderr
        assert str(run_dir / LOCK_NAME) in second.stderr and "another run_dir" in second.stderr
        assert (run_dir / "weights.txt").read_text() == "first"
        assert (run_dir / LOCK_NAME).read_bytes() == lock_bytes
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "weights.txt"]  # no leftovers
    finally:
        first.communicate(timeout=30)  # closes stdin: the holder leaves its `with`
    assert first.returncode == 0
    assert not (run_dir / LOCK_NAME).exists()
    third = subprocess.run([sys.executable, "-c", HOLDER, str(run_dir), "third"], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, env=ENV, timeout=60)
    assert third.returncode == 0, third.stderr
    assert (run_dir / "weights.txt").read_text() == "third" and not (run_dir / LOCK_NAME).exists()


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path: Path) -> None:
    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    p = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), "new"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "stale" in p.stderr and f"pid {dead}" in p.stderr
    assert (tmp_path / "weights.txt").read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["weights.txt"]


@pytest.mark.skipif(not LINUX, reason="pid start times come from /proc")
def test_recycled_pid_is_not_the_holder(tmp_path: Path) -> None:
    # the recorded pid is alive (this test), but it started at another time: the holder is gone
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "pid_start_ticks": 1}))
    with RunFolderLock(tmp_path) as lock:
        assert lock.held and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_flock_held_means_live_even_if_pid_looks_dead(tmp_path: Path) -> None:
    # e.g. a holder in another pid namespace of this host: its pid is not visible, its flock is
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "flock": True}))
    flocker = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'r+'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('ok', flush=True); sys.stdin.read()", str(tmp_path / LOCK_NAME)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert flocker.stdout is not None and flocker.stdout.readline().strip() == "ok"
        with pytest.raises(RunFolderLockedError, match="flock"):
            RunFolderLock(tmp_path).acquire()
        assert (tmp_path / LOCK_NAME).exists()
    finally:
        flocker.communicate(timeout=30)
    with RunFolderLock(tmp_path):  # flock free and pid dead: stale
        pass


def test_other_host_refused_with_how_to_remove(tmp_path: Path) -> None:
    record = {"host": "gpu-node-17", "pid": 4242, "launcher_pid": 4200, "job_id": "777", "started": "yesterday"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunFolderLockedError) as e:
        RunFolderLock(tmp_path).acquire()
    msg = str(e.value)
    assert "host gpu-node-17" in msg and "pid 4242" in msg and "cannot be checked" in msg
    assert f"rm {tmp_path / LOCK_NAME}" in msg
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == record


def test_requeued_slurm_job_takes_over_its_earlier_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"host": "gpu-node-17", "pid": 4242, "slurm_job_id": "777", "slurm_restart_count": 0}))
    monkeypatch.setenv("SLURM_JOB_ID", "778")  # another job: refused
    with pytest.raises(RunFolderLockedError):
        RunFolderLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with RunFolderLock(tmp_path) as lock:
        assert lock.holder is not None and lock.holder.slurm_restart_count == 1


def test_other_ranks_do_not_take_it_and_exceptions_release(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path, "rank0")
    try:
        with RunFolderLock(tmp_path, rank=1) as lock:  # a rank of the holder's own launch
            assert not lock.held
    finally:
        holder.communicate(timeout=30)
    with pytest.raises(KeyError), RunFolderLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_exit_without_with_releases(tmp_path: Path) -> None:
    script = ("import sys; from megads.train.run_lock import RunFolderLock; "
              "RunFolderLock(sys.argv[1]).acquire(); raise SystemExit('refused later, e.g. a ConfigError')")
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert p.returncode == 1 and "refused later" in p.stderr
    assert not (tmp_path / LOCK_NAME).exists()


def test_sigterm_releases(tmp_path: Path) -> None:
    holder = _start_holder(tmp_path, "x")
    holder.send_signal(signal.SIGTERM)
    holder.communicate(timeout=30)
    assert holder.returncode == -signal.SIGTERM  # still dies of the signal
    assert not (tmp_path / LOCK_NAME).exists()


def test_two_simultaneous_launches_one_wins(tmp_path: Path) -> None:
    dead = _dead_pid()  # both also race for the takeover of a stale lock
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    procs = [subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), str(i)], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=ENV, text=True) for i in range(4)]
    try:  # the winner holds the lock until its stdin closes, so every loser meets it
        _wait_for(lambda: sum(p.poll() is not None for p in procs) >= 3, 60, "three launches to be refused")
        losers = [p for p in procs if p.poll() is not None]
        assert len(losers) == 3
        assert all(p.returncode != 0 and "RunFolderLockedError" in p.communicate()[1] for p in losers)
        (winner,) = [i for i, p in enumerate(procs) if p not in losers]
        assert (tmp_path / "weights.txt").read_text() == str(winner)
    finally:
        for p in procs:
            p.communicate(timeout=30)
    assert procs[winner].returncode == 0


# --------------------------------------------------------------------------- launcher death

# the worker: arms the mechanism(s) named by argv[2], then beats a heartbeat file
WORKER = """
import os, sys, time, pathlib
delay = float(os.environ.get("WORKER_DELAY", "0"))
time.sleep(delay)
from megads.train.run_lock import exit_when_launcher_dies
kw = {"both": {}, "prctl": {"poll_s": None}, "poll": {"use_prctl": False}}[sys.argv[2]]
if os.environ.get("LAUNCHER_PID"):
    kw["parent_pid"] = int(os.environ["LAUNCHER_PID"])
assert exit_when_launcher_dies(**kw)
if len(sys.argv) > 3:  # also hold a run-folder lock, which must be released on the way out
    from megads.train.run_lock import RunFolderLock
    RunFolderLock(sys.argv[3]).acquire()
hb, tmp = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[1] + ".tmp")
i = 0
while True:
    i += 1
    tmp.write_text(str(i))
    os.replace(tmp, hb)
    time.sleep(0.05)
"""

# the launcher: like torchrun, starts the worker in a session of its own, then waits
LAUNCHER = """
import os, subprocess, sys, time
env = {**os.environ, "TORCHELASTIC_RUN_ID": "test-launch"}
if os.environ.get("PASS_PID"):
    env["LAUNCHER_PID"] = str(os.getpid())
w = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], env=env, start_new_session=True)
print(w.pid, flush=True)
if os.environ.get("EXIT_AT_ONCE"):
    os._exit(0)
time.sleep(600)
"""


def _launch_worker(tmp_path: Path, mode: str, *lock_dir: Path, **env: str) -> tuple[subprocess.Popen[str], int, Path]:
    hb = tmp_path / f"heartbeat-{mode}"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(hb), mode, *map(str, lock_dir)],
                                stdout=subprocess.PIPE, env={**ENV, **env}, text=True)
    assert launcher.stdout is not None
    return launcher, int(launcher.stdout.readline()), hb


@pytest.mark.skipif(not LINUX, reason="process states from /proc; PR_SET_PDEATHSIG is Linux")
@pytest.mark.parametrize("mode", ["both", "prctl", "poll"])
def test_worker_exits_when_launcher_is_killed(tmp_path: Path, mode: str) -> None:
    run_dir = tmp_path / "run"
    launcher, worker, hb = _launch_worker(tmp_path, mode, run_dir)
    try:
        _wait_for(hb.exists, 30, "the first heartbeat")
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == worker
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        _wait_for(lambda: _gone(worker), 5, f"worker {worker} to exit after its launcher's SIGKILL")
        beat = hb.read_text()
        time.sleep(0.5)
        assert hb.read_text() == beat, "the heartbeat goes on"
        assert not (run_dir / LOCK_NAME).exists()  # SIGTERM handler (prctl) or the watcher released it
    finally:
        _kill(launcher.pid)
        _kill(worker)


@pytest.mark.skipif(not LINUX, reason="process states from /proc")
@pytest.mark.parametrize("pass_pid", [True, False])
def test_worker_whose_launcher_died_before_the_call_exits(tmp_path: Path, pass_pid: bool) -> None:
    env = {"EXIT_AT_ONCE": "1", "WORKER_DELAY": "1.5", **({"PASS_PID": "1"} if pass_pid else {})}
    launcher, worker, hb = _launch_worker(tmp_path, "prctl", **env)
    try:
        launcher.wait(timeout=10)
        stat = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()
        if not pass_pid and stat[1] != "1":
            pytest.skip(f"orphans go to a subreaper (pid {stat[1]}) here, not init: only parent_pid detects it")
        _wait_for(lambda: _gone(worker), 10, f"worker {worker} to notice that its launcher is gone")
        assert not hb.exists()
    finally:
        _kill(worker)


TORCHRUN_WORKER = """
import os, sys, time, pathlib
from megads.train.run_lock import RunFolderLock, exit_when_launcher_dies
assert exit_when_launcher_dies()
run_dir, rank = pathlib.Path(sys.argv[1]), int(os.environ["RANK"])
with RunFolderLock(run_dir, rank=rank):
    run_dir.mkdir(parents=True, exist_ok=True)  # rank 1 may get here before rank 0 made it
    hb, tmp = run_dir / f"hb{rank}", run_dir / f"hb{rank}.tmp"
    while True:
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, hb)
        time.sleep(0.05)
"""


@pytest.mark.skipif(not LINUX, reason="process states from /proc; PR_SET_PDEATHSIG is Linux")
def test_torchrun_kill9_ends_both_workers_and_frees_the_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), str(script), str(run_dir)],
        env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        _wait_for(lambda: all((run_dir / f"hb{r}").exists() for r in (0, 1)) or torchrun.poll() is not None,
                  60, "both workers' heartbeats")
        assert torchrun.poll() is None, torchrun.stderr.read() if torchrun.stderr else ""
        pids = [int((run_dir / f"hb{r}").read_text()) for r in (0, 1)]
        assert json.loads((run_dir / LOCK_NAME).read_text())["pid"] == pids[0]  # rank 0 holds; rank 1 trusts it
        with pytest.raises(RunFolderLockedError, match=f"pid {pids[0]}"):  # a second launch
            RunFolderLock(run_dir).acquire()
        os.kill(torchrun.pid, signal.SIGKILL)
        torchrun.wait(timeout=10)
        _wait_for(lambda: all(_gone(p) for p in pids), 5, f"workers {pids} to exit after torchrun's SIGKILL")
        assert not (run_dir / LOCK_NAME).exists()  # rank 0 released the lock on its way out
        with RunFolderLock(run_dir):
            pass
    finally:
        _kill(torchrun.pid)
        for p in pids:
            _kill(p)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


@pytest.mark.skipif(not LINUX, reason="reads /proc")
def test_trainer_refuses_a_second_launch_and_its_workers_die_with_torchrun(tmp_path: Path) -> None:
    """The wiring in megads.train.trainer: a real 2-rank training run holds its run folder; a
    second megads-train on that folder exits 2 naming the holder's pid and writes nothing; after
    `kill -9` of the first torchrun its workers are gone and stop writing."""
    run_dir = tmp_path / "run"
    args = ["model=tiny", "seq_len=32", "parallel=dp", "parallel.micro_batch_size=1", "schedule=tiny",
            "schedule.train_steps=100000", "schedule.warmup_steps=1", "schedule.batch_start=2",
            "schedule.batch_end=2", "data=fallback", "data.max_bytes=200000", "logging.wandb.mode=disabled",
            "checkpoint.every_steps=0", "checkpoint.at_end=false", f"run_dir={run_dir}"]
    env = {**ENV, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "megads.train.cli", *args],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: (metrics.is_file() and metrics.stat().st_size > 0) or first.poll() is not None,
                  120, "the first run's first step")
        assert first.poll() is None
        workers = _children(first.pid)
        holder = json.loads((run_dir / LOCK_NAME).read_text())["pid"]
        assert holder in workers and len(workers) == 2
        config_before = (run_dir / "config.yaml").read_bytes()
        second = subprocess.run([sys.executable, "-m", "megads.train.cli", *args], cwd=REPO, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {holder}" in second.stderr and "megads-train:" in second.stderr
        assert (run_dir / "config.yaml").read_bytes() == config_before
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        _wait_for(lambda: all(_gone(p) for p in workers), 10, f"workers {workers} to exit after torchrun died")
        size = metrics.stat().st_size
        time.sleep(1.0)
        assert metrics.stat().st_size == size  # nobody trains on
        assert not (run_dir / LOCK_NAME).exists()
    finally:
        _kill(first.pid)
        for p in workers:
            _kill(p)
