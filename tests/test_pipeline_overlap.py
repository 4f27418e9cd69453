"""F&B overlap runner: two chunks interleaved at their communication points.

Reference: the analytic times max(C, A) (overlapped) and C + A (sequential) of a chunk pair whose
compute C is a sleep on the main thread and whose all-to-all latency A is a sleep on the comm
thread. Sleeps make the check independent of CPU speed.
"""

from __future__ import annotations

import time

from pipeline.overlap import CommWorker, interleave

C_STEP = 0.04  # each of the 4 compute pieces
A_STEP = 0.04  # each of the 4 all-to-alls


def _fwd(comm: CommWorker, log: list[str]):
    time.sleep(C_STEP)
    log.append("f-attn")
    yield comm.submit(time.sleep, A_STEP)  # dispatch
    time.sleep(C_STEP)
    log.append("f-experts")
    yield comm.submit(time.sleep, A_STEP)  # combine
    return "y"


def _bwd(comm: CommWorker, log: list[str]):
    yield comm.submit(time.sleep, A_STEP)  # combine backward
    time.sleep(C_STEP)
    log.append("b-experts")
    yield comm.submit(time.sleep, A_STEP)  # dispatch backward
    time.sleep(C_STEP)
    log.append("b-attn")
    return "grad_x"


def test_interleave_hides_communication() -> None:
    total_c, total_a = 4 * C_STEP, 4 * A_STEP
    log: list[str] = []
    with CommWorker() as comm:
        t0 = time.perf_counter()
        gx, y = interleave(_bwd(comm, log), _fwd(comm, log))
        overlapped = time.perf_counter() - t0
        t0 = time.perf_counter()
        for gen in (_fwd(comm, []), _bwd(comm, [])):
            for h in gen:
                h.wait()
        sequential = time.perf_counter() - t0
    assert (gx, y) == ("grad_x", "y")
    # each generator's own order is kept, and the two are interleaved
    assert [e for e in log if e.startswith("f")] == ["f-attn", "f-experts"]
    assert [e for e in log if e.startswith("b")] == ["b-experts", "b-attn"]
    assert log != sorted(log, key=lambda e: e[0])
    assert sequential >= total_c + total_a
    # close to max(C, A) = 0.16 s, far from C + A = 0.32 s (slack for a loaded machine)
    assert overlapped < 0.75 * (total_c + total_a), (overlapped, sequential)
