"""`megads-convert to-hf` on real trainer checkpoints: trainer run -> HF folder -> transformers.

One 4-rank run (pp2 x ep2, DualPipeV with the F&B overlap executor, ZeRO-1; per-rank
`model_rank_*.pt` files, each rank holding two pipeline pieces and half of the experts) and one
single-process run (`model.pt`), two steps each on the tiny model at seq_len 32. For each:

  - the CLI (`python -m megads.convert.cli to-hf <step folder> <out>`) writes a HF folder and
    `transformers.DeepseekV3ForCausalLM.from_pretrained` reproduces the merged megads model's
    float32 logits within 1e-5 max-abs;
  - the merged parameters are what the ranks hold: re-sharding the merged model with the
    trainer's own `shard_experts` gives every rank file's tensors bit for bit;
  - against a single-process reference: the trainer starts from `torch.manual_seed(seed);
    DeepseekV3(cfg)`, and two AdamW steps move each element by at most sum(lr) * (1 + wd)
    (|m_hat / sqrt(v_hat)| <= 1 in the first two steps, |w| <= 1 here), the router biases by
    sum(gamma); so every merged tensor lies within that bound of the seeded model, which a
    misplaced expert or layer (distance ~0.1) cannot.

Bad input (interrupted save, missing rank file, replicas that disagree, shape mismatch, an old
meta.json without the model config) exits with status 2 and a message naming the path.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from test_hf_conversion import hf_logits, ours_logits  # noqa: E402
from transformers import DeepseekV3ForCausalLM  # noqa: E402

from megads.convert.cli import main  # noqa: E402
from megads.convert.trainer_checkpoint import load_model_from_checkpoint  # noqa: E402
from megads.model.transformer import DeepseekV3  # noqa: E402
from megads.parallel.expert_parallel import shard_experts  # noqa: E402
from megads.testing.launch import run_trainer, trainer_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
SEED = 1234
STEPS = 2
RUN = [
    "model=tiny", "seq_len=32", f"seed={SEED}", "schedule=tiny", f"schedule.train_steps={STEPS}",
    "schedule.train_tokens=0", "schedule.warmup_steps=2", "schedule.batch_start=8", "schedule.batch_end=8",
    "schedule.batch_ramp_tokens=0", "schedule.constant_tokens=5000", "schedule.decay_tokens=1000",
    "optim.lr=3e-3", "data=fallback", "data.max_bytes=400000", "checkpoint.every_steps=0",
]
# The main job's layout, spelled out (the default config may change under us).
SHARDED = ["parallel=pp2_ep2", "parallel.schedule=dualpipev", "parallel.micro_batch_size=1",
           "parallel.overlap_fb=true", "parallel.zero1=true"]
PP, EP, WORLD = 2, 2, 4


def _train(run_dir: Path, *overrides: str, nproc: int) -> Path:
    """Run megads-train (torchrun for nproc > 1); return the final step folder."""
    run_trainer([*RUN, f"run_dir={run_dir}", *overrides], nproc=nproc)
    step = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (step / "meta.json").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return step


def _convert_cli(src: Path, dst: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "megads.convert.cli", "to-hf", str(src), str(dst)], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"wrote {dst}" in proc.stdout


def _max_logit_diff(model: DeepseekV3, hf_dir: Path) -> float:
    hf = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return (ours_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()


def _rank_state(step: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(step / f"model_rank_{rank:05d}.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def sharded_step(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("dpv") / "run", *SHARDED, nproc=WORLD)


def test_sharded_checkpoint_to_hf_matches_transformers(sharded_step: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in sharded_step.glob("model*.pt")) == [f"model_rank_{r:05d}.pt" for r in range(WORLD)]
    _convert_cli(sharded_step, tmp_path / "hf")
    merged = load_model_from_checkpoint(sharded_step)
    diff = _max_logit_diff(merged, tmp_path / "hf")
    print(f"max |logit diff| megads (merged pp2 x ep2) vs transformers: {diff:.3e}")
    assert diff < TOL

    # The merged parameters are what the ranks hold: rank = pp_rank * dp + dp_rank, ep_rank =
    # dp_rank % ep; re-shard the merged model with the trainer's shard_experts for each ep_rank.
    dp = WORLD // PP
    held: dict[int, dict[str, torch.Tensor]] = {}
    for ep_rank in range(EP):
        shard = copy.deepcopy(merged)
        shard_experts(shard, group=None, ep_size=EP, ep_rank=ep_rank)
        held[ep_rank] = shard.state_dict()
    seen: set[str] = set()
    for rank in range(WORLD):
        for name, t in _rank_state(sharded_step, rank).items():
            assert torch.equal(t, held[(rank % dp) % EP][name]), (rank, name)
            seen.add(name)
    assert seen == set(merged.state_dict())

    # Single-process reference: the seeded initial model, moved by two optimizer steps at most.
    meta = json.loads((sharded_step / "meta.json").read_text())
    history = [json.loads(line) for line in (sharded_step.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == STEPS
    param_bound = sum(h["lr"] for h in history) * (1 + meta["settings"]["optim.weight_decay"]) * 1.001
    bias_bound = sum(h["bias_update_speed"] for h in history) + 1e-6
    torch.manual_seed(SEED)
    init = DeepseekV3(merged.cfg).state_dict()
    params = dict(merged.named_parameters())
    for name, t in merged.state_dict().items():
        dev = (t - init[name]).abs().max().item()
        assert dev <= (param_bound if name in params else bias_bound), (name, dev)
        if name in params:
            assert dev > 0, name  # trained: every tensor moved
    w = merged.state_dict()["layers.1.mlp.experts.gate_up_proj.weight"]
    swapped = w[[1, 0, *range(2, w.shape[0])]]
    assert (swapped - init["layers.1.mlp.experts.gate_up_proj.weight"]).abs().max() > 10 * param_bound


def test_single_process_checkpoint_to_hf(tmp_path: Path) -> None:
    step = _train(tmp_path / "run", "parallel=single", nproc=1)
    assert (step / "model.pt").is_file() and not list(step.glob("model_rank_*.pt"))
    assert main(["to-hf", str(step), str(tmp_path / "hf")]) == 0
    merged = load_model_from_checkpoint(step)
    saved = torch.load(step / "model.pt", map_location="cpu", weights_only=True)
    state = merged.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    diff = _max_logit_diff(merged, tmp_path / "hf")
    print(f"max |logit diff| megads (model.pt) vs transformers: {diff:.3e}")
    assert diff < TOL


# ----------------------------------------------------------------------------- bad input
def _copy_model_files(step: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in [step / "meta.json", *step.glob("model_rank_*.pt")]:
        shutil.copy(f, dst / f.name)
    return dst


def _fails(capsys: pytest.CaptureFixture[str], src: Path, dst: Path, *needles: str) -> None:
    assert main(["to-hf", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()


def test_bad_checkpoints_exit_2_naming_the_problem(
    sharded_step: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    unfinished = _copy_model_files(sharded_step, tmp_path / "step_00000002.tmp")
    (unfinished / "meta.json").unlink()
    _fails(capsys, unfinished, out, str(unfinished), "not a completed checkpoint", "interrupted")

    gap = _copy_model_files(sharded_step, tmp_path / "gap" / "step_00000002")
    (gap / "model_rank_00003.pt").unlink()
    _fails(capsys, gap, out, str(gap), "missing rank files ['model_rank_00003.pt']")

    name = "layers.1.self_attn.kv_b_proj.weight"  # a dense tensor of stage 1 (ranks 2 and 3)
    split = _copy_model_files(sharded_step, tmp_path / "split" / "step_00000002")
    state = _rank_state(split, 3)
    state[name] = state[name] + 1e-3
    torch.save(state, split / "model_rank_00003.pt")
    _fails(capsys, split, out, "model_rank_00003.pt", name, "differs", "model_rank_00002.pt")

    short = _copy_model_files(sharded_step, tmp_path / "short" / "step_00000002")
    for rank in (2, 3):
        state = _rank_state(short, rank)
        state[name] = state[name][:-1].clone()
        torch.save(state, short / f"model_rank_{rank:05d}.pt")
    _fails(capsys, short, out, str(short), name, "shape")


def test_old_meta_falls_back_to_the_run_config(
    sharded_step: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    step = _copy_model_files(sharded_step, tmp_path / "run" / "checkpoints" / "step_00000002")
    meta = json.loads((step / "meta.json").read_text())
    for key in ("model", "layout", "settings"):
        del meta[key]
    (step / "meta.json").write_text(json.dumps(meta))
    run_config = tmp_path / "run" / "config.yaml"
    _fails(capsys, step, tmp_path / "hf", str(run_config), "records no model config")

    shutil.copy(sharded_step.parents[1] / "config.yaml", run_config)
    old = load_model_from_checkpoint(step).state_dict()
    new = load_model_from_checkpoint(sharded_step).state_dict()
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new)
