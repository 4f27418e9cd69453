"""F&B overlap runner: two chunks interleaved at their communication points.

Structural reference, no clocks: every compute step and every communication event (submitted,
run on the comm thread, waited on, completed) is appended to one sequence. Overlap means that
each chunk's all-to-all is submitted BEFORE the other chunk's next compute step runs and waited
on only AFTER it: the transfer is in flight while the other side computes. Run one chunk after
the other (each handle waited on at once) and no transfer has the other's compute inside it.
"""

from __future__ import annotations

import threading
from typing import Any

from megads.pipeline.overlap import CommWorker, interleave


class Trace:
    """One ordered record of events from the main thread and the comm thread."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self._lock = threading.Lock()

    def record(self, event: str) -> None:
        with self._lock:
            self.events.append(event)

    def at(self, event: str) -> int:
        return self.events.index(event)


class _TracedHandle:
    """A comm handle that records when its owner waits on it and when the wait returns."""

    def __init__(self, handle: Any, name: str, trace: Trace) -> None:
        self._handle, self._name, self._trace = handle, name, trace

    def wait(self) -> Any:
        self._trace.record(f"wait {self._name}")
        out = self._handle.wait()
        self._trace.record(f"done {self._name}")
        return out


def _comm(comm: CommWorker, trace: Trace, name: str) -> _TracedHandle:
    trace.record(f"submit {name}")
    return _TracedHandle(comm.submit(trace.record, f"run {name}"), name, trace)


def _fwd(comm: CommWorker, trace: Trace):
    trace.record("compute f-attn")
    yield _comm(comm, trace, "f-dispatch")
    trace.record("compute f-experts")
    yield _comm(comm, trace, "f-combine")
    return "y"


def _bwd(comm: CommWorker, trace: Trace):
    yield _comm(comm, trace, "b-combine")  # a backward chunk starts with communication
    trace.record("compute b-experts")
    yield _comm(comm, trace, "b-dispatch")
    trace.record("compute b-attn")
    return "grad_x"


# each transfer and the other chunk's compute step it should hide behind
HIDDEN_BEHIND = {"b-combine": "f-attn", "f-dispatch": "b-experts", "b-dispatch": "f-experts", "f-combine": "b-attn"}


def _not_overlapped(trace: Trace) -> list[str]:
    """Transfers whose submit -> wait span does not contain the other chunk's compute step."""
    return [f"{name} (submitted at {trace.at(f'submit {name}')}, waited at {trace.at(f'wait {name}')}, "
            f"{other} at {trace.at(f'compute {other}')})"
            for name, other in HIDDEN_BEHIND.items()
            if not trace.at(f"submit {name}") < trace.at(f"compute {other}") < trace.at(f"wait {name}")]


def _check_own_order(trace: Trace) -> None:
    for prefix, order in (("f", ["compute f-attn", "submit f-dispatch", "done f-dispatch", "compute f-experts",
                                 "submit f-combine", "done f-combine"]),
                          ("b", ["submit b-combine", "done b-combine", "compute b-experts", "submit b-dispatch",
                                 "done b-dispatch", "compute b-attn"])):
        own = [e for e in trace.events if e.split(" ")[1].startswith(prefix) and not e.startswith(("wait", "run"))]
        assert own == order, own
    for name in HIDDEN_BEHIND:  # a generator resumes only after its transfer ran
        assert trace.at(f"submit {name}") < trace.at(f"run {name}") < trace.at(f"done {name}")


def test_interleave_hides_communication() -> None:
    trace = Trace()
    with CommWorker() as comm:
        gx, y = interleave(_bwd(comm, trace), _fwd(comm, trace))
    assert (gx, y) == ("grad_x", "y")
    _check_own_order(trace)
    assert _not_overlapped(trace) == [], trace.events


def test_sequential_chunks_hide_nothing() -> None:
    """The reference the check above must tell apart: one chunk after the other."""
    trace = Trace()
    with CommWorker() as comm:
        for gen in (_bwd(comm, trace), _fwd(comm, trace)):
            for handle in gen:
                handle.wait()
    _check_own_order(trace)
    assert len(_not_overlapped(trace)) == len(HIDDEN_BEHIND), trace.events
