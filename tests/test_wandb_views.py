"""What wandb gets (issue: cluster operations, item 4), read back from the offline run's own log.

A 2-rank expert-parallel run of the tiny model with every rank its own "node" (node-limited
routing in play), wandb offline; its transaction log (`run-<id>.wandb`, what `wandb sync` would
upload) is decoded with wandb's record schema (megads.testing.wandb_log) and must hold every key
people look for, the heatmap images, the resolved config, a name, tags; the heatmap PNG is in the
run folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from megads.testing.wandb_log import history_rows, logged_files, read_records, run_record

REPO = Path(__file__).resolve().parents[1]
KEYS = {
    "loss/total", "loss/lm", "loss/mtp", "loss/balance", "lr", "grad_norm", "tokens_per_s", "perf/mfu",
    "perf/tflops_per_rank", "memory/rss_gib", "a2a/bytes", "a2a/wait_s", "pipeline/bubble_fraction",
    "routing/nodes_per_token_mean", "routing/nodes_per_token_max", "routing/node_limit", "stage",
    "load/imbalance_mean", "load/imbalance_max",
}


def test_the_offline_run_holds_the_figures_people_ask_for(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["model=tiny", "parallel=ep", "parallel.ranks_per_node=1", "seq_len=64", "schedule=tiny",
            "schedule.train_tokens=0", "schedule.train_steps=4", "schedule.warmup_steps=2", "schedule.batch_start=4",
            "schedule.batch_end=4", "data=fallback", "data.max_bytes=200000", "logging.wandb.mode=offline",
            "logging.heatmap_every=2", "checkpoint.every_steps=100", f"run_dir={run}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, "-m", "megads.train.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (log,) = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    records = read_records(log)
    rows = [r for r in history_rows(records) if "loss/lm" in r]
    assert [r["_step"] for r in rows] == [1, 2, 3, 4]
    missing = KEYS - set(rows[-1])
    assert not missing, missing
    last = rows[-1]
    assert 0.0 < last["perf/mfu"] < 1.0 and last["memory/rss_gib"] > 0.05 and last["a2a/bytes"] > 0
    assert 0.0 <= last["pipeline/bubble_fraction"] < 1.0
    assert 1.0 <= last["routing/nodes_per_token_mean"] <= last["routing/nodes_per_token_max"] <= last[
        "routing/node_limit"] == 2  # two one-rank "nodes": a token reaches one or both, never more
    assert json.loads(json.dumps(last["stage"])) == 0
    # an image is a nested value: its keys are <name>/_type, <name>/path, ...
    heat = [r for r in history_rows(records) if r.get("load/heatmap/_type") == "image-file"]
    assert [r["_step"] for r in heat] == [2, 4], heat
    for name in ("loss", "expert_load", "pipeline_timeline", "expert_load_heatmap"):
        assert any(r.get(f"plots/{name}/_type") == "image-file" for r in history_rows(records)), name
    files = logged_files(records)
    assert any("load/heatmap" in f and f.endswith(".png") for f in files), files
    rec = run_record(records)
    assert rec.display_name and "pp1-ep2" in list(rec.tags), (rec.display_name, list(rec.tags))
    config_keys = {i.key for i in rec.config.update}
    assert {"model", "parallel", "optim", "schedule"} <= config_keys, config_keys
    png = run / "expert_load_heatmap.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
