"""tools/rank_memory: one rank built alone, its measured bytes against the analytic count.

Issue 11: any single rank of the real recipe is materialised on CPU without the other ranks and
its parameter, gradient and ZeRO-1 bytes must equal `megads.parallel.memory`'s count (ZeRO-1's
bucket padding named). Here the same on tiny layouts of every placement kind (1F1B with the
tied embedding copy, DualPipe's replicas, DualPipeV's V, one process), with buckets small enough
that the padding is not zero; and, independently of both the formula and the tool, the ranks of
a layout together hold every parameter of the single-process model exactly once (each expert
on exactly one ep rank).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megads.model.transformer import DeepseekV3
from megads.train.cli import compose_config as compose
from tools.rank_memory import main, run

REPO = Path(__file__).resolve().parents[1]

LAYOUTS = {  # name -> (overrides, world)
    "1f1b pp2 ep2 dp6, bf16 moments, small buckets": (
        ["model=tiny", "parallel=pp2_ep2", "parallel.bucket_numel=1000", "parallel.moments_dtype=bfloat16"], 12),
    "dualpipe pp2 ep2": (["model=tiny", "parallel=pp2_ep2", "parallel.schedule=dualpipe"], 4),
    "dualpipev pp2 ep2": (["model=tiny", "parallel=dualpipev_pp2_ep2", "parallel.bucket_numel=777"], 4),
    "single": (["model=tiny", "parallel=single"], 1),
}


def _ok(row: dict) -> bool:
    return row["measured"] == row["analytic"] + row["extra"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_rank_measures_its_analytic_bytes(name: str) -> None:
    overrides, world = LAYOUTS[name]
    results = [run(overrides, world=world, rank=r, ranks_per_node=None, touch=False) for r in range(world)]
    for res in results:
        bad = [r for r in res["rows"] if not _ok(r)]
        assert not bad, (res["mesh"], bad)
        assert sum(r["measured"] for r in res["rows"] if r["what"].startswith("parameters")) > 0
    padding = [r for res in results for r in res["rows"] if "padding" in r["what"] and "padding 0 el" not in r["what"]]
    if "small buckets" in name:
        assert padding, "the bucket size was chosen so that some bucket is padded"

    # every parameter of the one-process model lives on the layout's ranks exactly once
    cfg = compose(overrides).model
    with torch.device("meta"):
        whole = {n: p.numel() for n, p in DeepseekV3(cfg).named_parameters()}
    held: dict[str, int] = {}
    seen: set[tuple[str, int]] = set()
    for res in results:
        for n, numel in res["param_numel"].items():
            key = (n, res["ep_rank"] if n in res["expert_names"] else -1)
            if key not in seen:  # dp and DualPipe replicas hold the same slice
                seen.add(key)
                held[n] = held.get(n, 0) + numel
    assert held == whole


def test_cli_exit_status_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["model=tiny", "parallel=pp2_ep2", "--world", "4", "--rank", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "rank 2/4: pp 1/2" in text and "peak RSS" in text and " NO" not in text
    assert out.is_file()


def _cli_json(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    # a fixed mmap threshold: large blocks always come from fresh (untouched) mappings
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    subprocess.run([sys.executable, "-m", "tools.rank_memory", *args, "--json", str(out)], check=True,
                   cwd=REPO, capture_output=True, timeout=300, env=env)
    return json.loads(out.read_text())


def test_touch_makes_the_footprint_resident(tmp_path: Path) -> None:
    """Untouched, the allocation is virtual (a 671B rank fits this machine's RAM); --touch writes
    every byte, and the fresh process's peak RSS then covers the whole model state."""
    args = ("model=tiny", "model.vocab_size=320000", "parallel=single", "--world", "1", "--rank", "0")
    lazy, touched = _cli_json(tmp_path, *args), _cli_json(tmp_path, *args, "--touch")
    state = sum(r["measured"] for r in touched["rows"])
    assert state == sum(r["measured"] for r in lazy["rows"]) > 900 << 20
    # --touch makes the whole state resident; the untouched run stays well below it. (Not `lazy <
    # state`: on this machine the untouched run already peaks at 903 MB of the 992 MB state, at
    # ee76404 too, and at 971-1042 MB in CI's fresh clone: part of the state is written at build;
    # which part is an open question, see docs/performance.md, "One rank of DeepSeek-V3 671B".)
    assert state <= touched["peak_rss"], (state, touched["peak_rss"])
    assert lazy["peak_rss"] < touched["peak_rss"] - state // 5, (lazy["peak_rss"], state, touched["peak_rss"])
