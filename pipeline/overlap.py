"""Compute/communication overlap for the F&B action: interleave two chunks at their comm points.

A chunk's forward or backward is written as a generator that runs compute until it has *issued*
an asynchronous communication (an expert all-to-all dispatch or combine), then yields the handle
(anything with `.wait()`, e.g. the work of `dist.all_to_all_single(..., async_op=True)`).
`interleave(b_steps, f_steps)` runs the generators round-robin: while one chunk's all-to-all is in
flight the other chunk computes, and a generator is resumed only after its handle completes.

    def fwd(x):                      # attention -> dispatch -> experts -> combine
        h = attention(x); yield (d := dispatch_async(h))
        e = experts(d.result); yield (c := combine_async(e))
        return c.result
    y, grad_x = interleave(fwd(x), bwd(grad_y))

Start with the generator whose first step is communication (a backward chunk begins with the
combine all-to-all of its output gradient): its transfer then hides behind the other's first
compute. With compute C and communication A per pair, the F&B time approaches max(C, A) rather
than C + A. `CommWorker` runs blocking communication (or a simulated latency) on a side thread
and returns waitable futures, for backends or tests without native async collectives.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Generator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Waitable(Protocol):
    def wait(self) -> Any: ...


StepGen = Generator[Waitable | None, None, Any]


def interleave(*steps: StepGen) -> list[Any]:
    """Run generators round-robin, waiting on each yielded handle before resuming its generator.

    Returns the generators' return values in argument order.
    """
    n = len(steps)
    handles: list[Waitable | None] = [None] * n
    results: list[Any] = [None] * n
    active = list(range(n))
    while active:
        for i in list(active):
            h = handles[i]
            if h is not None:
                h.wait()
            try:
                handles[i] = next(steps[i])
            except StopIteration as stop:
                results[i] = stop.value
                active.remove(i)
    return results


class _Future:
    def __init__(self, fut: concurrent.futures.Future[Any]) -> None:
        self._fut = fut

    def wait(self) -> Any:
        return self._fut.result()

    @property
    def result(self) -> Any:
        return self._fut.result()


class CommWorker:
    """One background thread that runs communication callables in submission order."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-comm")

    def submit(self, fn: Callable[..., T], *args: Any) -> _Future:
        return _Future(self._pool.submit(fn, *args))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> CommWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
