"""Leak watch for long runs: sample every rank's memory, file descriptors and threads from outside.

A soak test launches a real multi-rank run and, while it trains, a `ProcessSampler` thread reads
for each worker process (found by `megads.testing.launch.worker_pids`)

    VmRSS            /proc/<pid>/status, KiB: the resident memory
    open fds         entries of /proc/<pid>/fd
    threads          entries of /proc/<pid>/task

every `interval_s`, tagged with the training step reached (the line count of the run's
metrics.jsonl, read incrementally). Nothing runs inside the trainer: the figures are what the
operating system sees.

`leak_report` turns the samples into figures per rank: the warm-up is the first `warmup_steps`
steps (allocator pools, the first checkpoint's buffers, the background writer's group), then the
"start" is the median of the samples in the next `window_steps` steps and the "end" the median of
the last `window_steps` steps. RSS growth is end / start - 1; fds and threads report the same
medians and the maximum after warm-up, so a leak (a descriptor or a thread per save or per step)
shows as end > start, while a save in flight shows only as a short peak.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcSample:
    t: float  # seconds since the sampler started
    step: int  # training steps logged when the sample was taken
    rank: int
    rss_kib: int
    fds: int
    threads: int


def read_proc(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS KiB, open fds, threads) of `pid`; None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())
        threads = sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())
    except (OSError, ValueError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]), fds, threads
    return None  # a zombie has no VmRSS


class StepCounter:
    """Steps logged so far: the newline count of a growing metrics.jsonl, read incrementally."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._lines = 0

    def __call__(self) -> int:
        try:
            if self.path.stat().st_size < self._offset:  # rewritten (a resume trims the log): count again
                self._offset = self._lines = 0
            with self.path.open("rb") as f:
                f.seek(self._offset)
                new = f.read()
        except OSError:
            return self._lines
        self._offset += len(new)
        self._lines += new.count(b"\n")
        return self._lines


class ProcessSampler:
    """Samples `pids()` (rank -> pid) every `interval_s` on a daemon thread until `stop()`."""

    def __init__(self, pids: Callable[[], dict[int, int]], *, step: Callable[[], int], interval_s: float = 0.5) -> None:
        self.samples: list[ProcSample] = []
        self._pids = pids
        self._step = step
        self._interval = interval_s
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)

    def start(self) -> ProcessSampler:
        self._thread.start()
        return self

    def stop(self) -> list[ProcSample]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            step = self._step()
            for rank, pid in sorted(self._pids().items()):
                got = read_proc(pid)
                if got is not None:
                    self.samples.append(ProcSample(time.monotonic() - self._t0, step, rank, *got))


@dataclass(frozen=True)
class RankFigures:
    rank: int
    rss_start_mib: float
    rss_end_mib: float
    rss_peak_mib: float
    fds_start: float
    fds_end: float
    fds_max: int
    threads_start: float
    threads_end: float
    threads_max: int
    samples: int

    @property
    def rss_growth(self) -> float:
        return self.rss_end_mib / self.rss_start_mib - 1.0

    def line(self) -> str:
        return (f"rank {self.rank}: RSS {self.rss_start_mib:.1f} -> {self.rss_end_mib:.1f} MiB "
                f"({100 * self.rss_growth:+.2f}%, peak {self.rss_peak_mib:.1f}), fds {self.fds_start:g} -> "
                f"{self.fds_end:g} (max {self.fds_max}), threads {self.threads_start:g} -> {self.threads_end:g} "
                f"(max {self.threads_max}), {self.samples} samples")


def leak_report(samples: list[ProcSample], *, total_steps: int, warmup_steps: int,
                window_steps: int) -> dict[int, RankFigures]:
    """Per-rank figures after warm-up (see the module docstring); ValueError when a window is empty."""
    out: dict[int, RankFigures] = {}
    for rank in sorted({s.rank for s in samples}):
        mine = [s for s in samples if s.rank == rank and s.step >= warmup_steps]
        start = [s for s in mine if s.step < warmup_steps + window_steps]
        end = [s for s in mine if s.step >= total_steps - window_steps]
        if not start or not end:
            raise ValueError(f"rank {rank}: no samples in the start or end window ({len(start)}, {len(end)}); "
                             "sample more often or run longer")

        def med(xs: list[ProcSample], key: str) -> float:
            return statistics.median(getattr(s, key) for s in xs)

        out[rank] = RankFigures(
            rank=rank, rss_start_mib=med(start, "rss_kib") / 1024, rss_end_mib=med(end, "rss_kib") / 1024,
            rss_peak_mib=max(s.rss_kib for s in mine) / 1024, fds_start=med(start, "fds"), fds_end=med(end, "fds"),
            fds_max=max(s.fds for s in mine), threads_start=med(start, "threads"), threads_end=med(end, "threads"),
            threads_max=max(s.threads for s in mine), samples=len(mine),
        )
    return out


def plot_rss(samples: list[ProcSample], path: Path, *, title: str, warmup_steps: int) -> Path:
    """RSS (MiB) over training steps, one line per rank, the warm-up shaded; written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
    for rank in sorted({s.rank for s in samples}):
        mine = [s for s in samples if s.rank == rank and s.step >= 1]  # from the first step: start-up off the scale
        ax.plot([s.step for s in mine], [s.rss_kib / 1024 for s in mine], lw=1, label=f"rank {rank}")
    ax.axvspan(0, warmup_steps, color="0.9", label="warm-up")
    ax.set_xlabel("step")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=5)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
