"""Preemption that loses nothing: a signal ends the run after the current step, with a checkpoint.

Slurm announces the end of a job with a signal: `--signal=B:USR1@N` N seconds before the time
limit (to the batch script, which forwards it: launch/slurm.sbatch), `scancel --signal=USR1`,
and SIGTERM on preemption, `scontrol requeue` or the time limit itself (SIGKILL follows after
the cluster's `KillWait`, 30 s by default). torchrun passes the signals in its
`TORCHELASTIC_SIGNALS_TO_HANDLE` list on to its workers (launch/local.sh adds SIGUSR1 to it).

On every rank `PreemptionWatch` turns SIGUSR1 and SIGTERM into a request; the trainer asks
`agreed()` after each step, an all-reduce (max) of the request over the world group, so every
rank stops after the same step even when the signal reached only some ranks, or reached them
at different moments. Then the trainer saves a checkpoint of that step, closes its logs (the
wandb history is flushed), and raises `Preempted`; the CLI exits with `EXIT_PREEMPTED` (75,
EX_TEMPFAIL: "try again later") and, when the environment names one, touches the marker file
`MEGADS_PREEMPTION_MARKER` (the batch script requeues the job when it finds it: torchrun's own
exit code says nothing useful after it was signalled). The requeued job resumes from that
checkpoint: 0 steps lost. Under submitit (Hydra sweeps on Slurm) its requeue signal (SIGUSR2)
is watched too, and after the checkpoint it goes back to submitit's handler, which requeues.

Repeats of the signal while the stop is pending change nothing: Slurm often delivers the same
signal twice (to the tasks directly, and through srun, which forwards what it gets). To end a
rank at once, send SIGKILL (or SIGINT, which stays Python's KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("megads.train")

EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: stopped on a signal with a checkpoint; requeue to go on
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
MARKER_ENV = "MEGADS_PREEMPTION_MARKER"


def submitit_signal(environ: dict[str, str] | None = None) -> signal.Signals | None:
    """The signal submitit requeues its jobs on (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says),
    when this process is a submitit Slurm job (a Hydra sweep through hydra/launcher=slurm)."""
    env = os.environ if environ is None else environ
    if env.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return getattr(signal, "SIG" + env.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def watched_signals(environ: dict[str, str] | None = None) -> tuple[signal.Signals, ...]:
    """SIGUSR1 and SIGTERM, and under submitit its requeue signal too (see `hand_over`)."""
    extra = submitit_signal(environ)
    return PREEMPTION_SIGNALS + ((extra,) if extra is not None and extra not in PREEMPTION_SIGNALS else ())


def hand_over(preempted: Preempted) -> bool:
    """Under submitit, after the checkpoint: give submitit's own signal back to its handler, which
    requeues the job from rank 0 (its handler was restored when the watch ended). True if done."""
    sig = submitit_signal()
    if sig is None or preempted.signal_name != sig.name or not callable(signal.getsignal(sig)):
        return False
    signal.raise_signal(sig)
    return True


class Preempted(Exception):  # noqa: N818 - not an error: the run stopped as asked
    """The run stopped after `step` on `signal_name`, with the checkpoint `checkpoint`."""

    def __init__(self, *, step: int, signal_name: str, checkpoint: Path | None) -> None:
        super().__init__(f"stopped after step {step} on {signal_name}; checkpoint {checkpoint}")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class PreemptionWatch:
    """Signal handlers that record a stop request (a context manager: the old handlers come back)."""

    def __init__(self, signals: tuple[signal.Signals, ...] | None = None) -> None:
        self.signals = signals if signals is not None else watched_signals()
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> PreemptionWatch:
        """Take over the signals (only the main thread can: elsewhere the watch stays deaf)."""
        if threading.current_thread() is not threading.main_thread():
            log.debug("preemption signals are not watched: not the main thread")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        """Give the signals back to the handlers they had (unless someone replaced ours since)."""
        for sig, prev in self._previous.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, prev)
        self._previous.clear()

    def __enter__(self) -> PreemptionWatch:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return  # repeats are common (Slurm signals srun and the tasks, srun forwards it again)
        sig = signal.Signals(signum)
        self.received = sig
        # The message is written from the handler on purpose: a person waiting on the log sees at once
        # that the signal arrived, before the step (which may take minutes on a big model) ends.
        log.warning(f"{sig.name} received: stopping after this step with a checkpoint")

    def agreed(self, *, device: torch.device) -> signal.Signals | None:
        """The signal every rank stops for (if ranks got different ones, the highest-numbered), or None.

        A collective over the world group: every rank calls it after every step."""
        mine = int(self.received) if self.received is not None else 0
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([mine], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())) if int(flag.item()) else None


def touch_marker(preempted: Preempted, environ: dict[str, str] | None = None) -> Path | None:
    """Write the marker file named by MEGADS_PREEMPTION_MARKER (atomic), if any."""
    path = (os.environ if environ is None else environ).get(MARKER_ENV)
    if not path:
        return None
    marker = Path(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(f"step {preempted.step}\nsignal {preempted.signal_name}\ncheckpoint {preempted.checkpoint}\n")
    os.replace(tmp, marker)
    return marker
