"""The harness that starts the multi-process tests' ranks (`megads.testing.parallel.start_ranks`).

Ranks fork from one fork server that has torch and megads imported; these checks hold what
`torch.multiprocessing.spawn` gave the tests before: each rank gets its index, the caller's
environment at the time of the call (not the server's, which started earlier), and a rank that
raises fails the call with its error.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.multiprocessing import ProcessRaisedException

from megads.testing.parallel import start_ranks


def _write_env(rank: int, out: str, key: str) -> None:
    Path(out, f"rank{rank}").write_text(f"{os.environ.get(key)} {os.getpid()}")


def _fail_on_one(rank: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")


def test_ranks_see_the_callers_environment_of_each_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pids = set()
    for value in ("first", "second"):  # the fork server started on the first call; the second must see "second"
        monkeypatch.setenv("MEGADS_HARNESS_PROBE", value)
        start_ranks(_write_env, (str(tmp_path), "MEGADS_HARNESS_PROBE"), 2)
        got = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
        assert [g[0] for g in got] == [value, value]
        pids |= {int(g[1]) for g in got}
    assert len(pids) == 4 and os.getpid() not in pids  # four fresh processes


def test_a_failing_rank_fails_the_call() -> None:
    with pytest.raises(ProcessRaisedException, match="rank 1 fails on purpose"):
        start_ranks(_fail_on_one, (), 2)
