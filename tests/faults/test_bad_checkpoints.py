"""Bad checkpoints (issue 16, item 6): damaged, foreign and half-written step folders in a run.

A 2-rank data-parallel run (ZeRO-1: each rank writes its own optimizer shard) of the tiny model
checkpoints every 2 steps to step 8: the uninterrupted reference. The damaged runs start from a
copy of its folder without step 8 (a run killed after step 8, before its last save) and relaunch
to step 8 after damaging the newest checkpoint, step 6:

    one bit of an optimizer shard's bytes (rank 1's file), one bit of a model tensor's bytes,
    a truncated data file
        -> the manifest check names the file, step 6 is skipped, the run resumes from step 4:
           2 steps re-run (= checkpoint.every_steps), losses and gradient norms equal the
           reference's bit for bit (0 silent loss); the flipped bytes are shown to change the
           tensor they belong to, so only the checksum stands between them and a silent load
    a folder from another model config as the newest
        -> refused before training, naming it and the differing fields; nothing written
    a format-1 folder and a non-megads folder named like a step as the newest
        -> each named in a warning and skipped; resumed from step 6
    a stale `.tmp` folder of a killed save
        -> removed at start (and only it); resumed from step 6

Explicitly named foreign folders (format 1, weights only) are refused by the preflight.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megads.checkpoint.dcp import commit_folder, load_state, save_state, saved_keys, verify_folder
from megads.testing.launch import REPO, run_trainer, trainer_command, trainer_env
from megads.train.cli import compose_config
from megads.train.config import ConfigError
from megads.train.preflight import check_resume, find_resume

ARGS = ["model=tiny", "parallel=dp", "parallel.micro_batch_size=2", "seq_len=32", "schedule=tiny",
        "schedule.train_tokens=0", "schedule.train_steps=8", "schedule.warmup_steps=2", "schedule.batch_start=4",
        "schedule.batch_end=4", "data=fallback", "data.max_bytes=200000", "logging.wandb.mode=disabled",
        "checkpoint.every_steps=2", "checkpoint.keep_last=0", "logging.loss_png=false",
        "logging.expert_load_png=false", "logging.expert_heatmap_png=false"]
STEP4, STEP6 = "step_00000004", "step_00000006"


def _losses(run: Path) -> list[tuple[float, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss/lm"], r["grad_norm"]) for r in rows]


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("ref") / "run"
    run_trainer([*ARGS, f"run_dir={run}"], nproc=2, timeout=300)
    return run


def _killed_before_last_save(ref: Path, run: Path) -> Path:
    """`run`: the reference's checkpoints 2-6 and its full metric log; step 6 is the newest."""
    shutil.copytree(ref / "checkpoints", run / "checkpoints", ignore=shutil.ignore_patterns("step_00000008"))
    shutil.copy(ref / "metrics.jsonl", run / "metrics.jsonl")
    return run / "checkpoints" / STEP6


def _resume(run: Path, ref: Path) -> str:
    """Relaunch to step 8; assert the reference's losses bit for bit; the launch's output."""
    out = run_trainer([*ARGS, f"run_dir={run}"], nproc=2, timeout=300)
    assert _losses(run) == _losses(ref)
    verify_folder(run / "checkpoints" / "step_00000008")
    return out.stdout + out.stderr


def _largest_chunk(folder: Path, prefix: str, *, file: str = "") -> tuple[str, Path, int, int]:
    """(key, data file, offset, length) of the biggest stored box of a key starting with `prefix`
    (in a data file whose name starts with `file`)."""
    md = FileSystemReader(str(folder)).read_metadata()
    idx, info = max(((i, s) for i, s in md.storage_data.items()
                     if i.fqn.startswith(prefix) and str(s.relative_path).startswith(file)),
                    key=lambda item: item[1].length)
    return idx.fqn, folder / info.relative_path, info.offset, info.length


def _read_key(folder: Path, key: str) -> torch.Tensor:
    """The whole saved tensor `key`, read without any manifest check."""
    md = saved_keys(folder)[key]
    state = {key: torch.empty(tuple(md.size), dtype=md.properties.dtype)}
    load_state(folder, state)
    return state[key]


# The model-shard flip runs in `make test-all`: the same detection and fallback path as the optimizer
# shard's (the manifest checksums cover every file), whose silent load was the reported bug.
@pytest.mark.parametrize("what", ["optim.", pytest.param("model.", marks=pytest.mark.slow)],
                         ids=["optimizer-shard", "model-shard"])
def test_a_bit_flip_in_the_latest_checkpoint_falls_back_to_the_previous(what: str, ref: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    step6 = _killed_before_last_save(ref, run)
    # an optimizer shard: rank 1's own ZeRO-1 range in its file; a model tensor: wherever DCP wrote it
    key, f, offset, length = _largest_chunk(step6, what, file="__1_" if what == "optim." else "")
    intact = _read_key(step6, key)
    raw = bytearray(f.read_bytes())
    raw[offset + length // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    assert not torch.equal(_read_key(step6, key), intact), key  # the flip is in the tensor's bytes

    out = _resume(run, ref)
    assert f"checkpoint {STEP6} is corrupt and is skipped: {f}: SHA-256 differs" in out, out[-3000:]
    assert f"resuming from the previous complete checkpoint {STEP4} instead of {STEP6}" in out
    assert f"resumed from {run / 'checkpoints' / STEP4} at step 4" in out  # 2 steps re-run


@pytest.mark.slow  # tests/test_checkpoint_format.py::test_truncated_or_altered_latest_falls_back_to_the_previous is the fast cover
def test_a_truncated_shard_falls_back_to_the_previous(ref: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    step6 = _killed_before_last_save(ref, run)
    f = step6 / "__1_0.distcp"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    out = _resume(run, ref)
    assert f"{f}: {size // 2} bytes, the manifest says {size} (truncated?)" in out, out[-3000:]
    assert f"resumed from {run / 'checkpoints' / STEP4} at step 4" in out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_checkpoint_of_another_model_is_refused_and_nothing_written(ref: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    run_trainer([*ARGS, "model.num_hidden_layers=3", "schedule.train_steps=2", f"run_dir={other}"], nproc=1)
    run = tmp_path / "run"
    _killed_before_last_save(ref, run)
    foreign = run / "checkpoints" / "step_00000010"
    shutil.copytree(other / "checkpoints" / "step_00000002", foreign)  # verifies: intact, but not this run's
    before = _snapshot(run)
    proc = subprocess.run(trainer_command([*ARGS, f"run_dir={run}"], nproc=1), cwd=REPO, env=trainer_env(),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{foreign} belongs to a run with a different model" in out, out[-3000:]
    assert "model.num_hidden_layers 3 -> 4" in out and "it is not loaded" in out
    assert _snapshot(run) == before  # a refused launch writes nothing


def test_foreign_folders_named_like_steps_are_named_and_skipped(ref: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _killed_before_last_save(ref, run)
    old = run / "checkpoints" / "step_00000012"  # format 1: per-rank torch.save files
    old.mkdir()
    torch.save({"model": {}}, old / "rank_0.pt")
    (old / "meta.json").write_text(json.dumps({"format": 1, "step": 12}))
    hf = run / "checkpoints" / "step_00000014"  # another tool's folder: no completion marker
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\0" * 64)
    out = _resume(run, ref)
    assert f"checkpoint step_00000012 is corrupt and is skipped: {old / 'meta.json'}: checkpoint format 1" in out, \
        out[-3000:]
    assert f"{hf} is named like a checkpoint but has no meta.json" in out and "it is ignored" in out
    assert f"resumed from {run / 'checkpoints' / STEP6} at step 6" in out
    assert old.is_dir() and hf.is_dir()  # reported, not removed


def test_stale_tmp_folders_of_a_killed_save_are_removed_at_start(ref: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    step6 = _killed_before_last_save(ref, run)
    ckpts = run / "checkpoints"
    stale = ckpts / "step_00000008.tmp"  # what a kill during the step-8 save leaves
    shutil.copytree(step6, stale, ignore=shutil.ignore_patterns("meta.json", "manifest.json"))
    keep = [ckpts / "step_00000009.tmp.notes", ckpts / "mine.tmp", ckpts / "step_9.tmp"]  # not our naming
    for k in keep:
        k.mkdir()
    out = _resume(run, ref)
    assert f"removed {stale}, the partial folder of an interrupted save" in out, out[-3000:]
    assert f"resumed from {step6} at step 6" in out
    assert all(k.is_dir() for k in keep)
    assert sorted(p.name for p in ckpts.iterdir() if p.name.endswith(".tmp")) == ["mine.tmp", "step_9.tmp"]


def test_explicitly_named_foreign_folders_are_refused(ref: Path, tmp_path: Path) -> None:
    """checkpoint.resume=<folder> of another format, or of weights only: refused, never loaded."""
    cfg = compose_config([*ARGS, f"run_dir={tmp_path / 'run'}"])
    old = tmp_path / "format1"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({"format": 1, "step": 3}))
    explicit = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(old)))
    with pytest.raises(ConfigError, match="checkpoint format 1, this megads reads format 2"):
        find_resume(explicit, ckpt_dir=tmp_path / "none")
    weights = tmp_path / "weights"  # what megads-convert from-hf writes: model tensors, weights_only
    tensors = {k: v for k, v in saved_keys(ref / "checkpoints" / STEP4).items() if k.startswith("model.")}
    state = {k: torch.zeros(tuple(md.size), dtype=md.properties.dtype) for k, md in tensors.items()}
    save_state(weights.with_suffix(".tmp"), state)
    commit_folder(weights.with_suffix(".tmp"), weights, meta={"step": 0, "weights_only": True})
    with pytest.raises(ConfigError, match="holds weights only .* checkpoint.init_from="):
        check_resume(cfg, resume_from=weights, world_size=2, fingerprint="x")
