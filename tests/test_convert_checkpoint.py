"""`megads-convert to-hf` on real trainer checkpoints (DCP step folders) -> HF folder -> transformers.

Two sources of step folders, both written by the training code itself, never by this test:

  - the parallel executor under pp2 x ep2 (DualPipeV, ZeRO-1) on 4 gloo ranks, saved through
    `megads.checkpoint` (`megads.testing.parallel.checkpoint_worker`): expert boxes of E/ep rows
    from two ranks each, replicated tensors from several, optimizer / loader / RNG entries beside;
  - `megads-train` runs (torchrun, the same layout; and one process) on the tiny model.

For each: the CLI (`python -m megads.convert.cli to-hf <step folder> <out>`) writes a HF folder
and `transformers.DeepseekV3ForCausalLM.from_pretrained` reproduces the megads model's float32
logits (`megads.convert.checkpoint.load_model`) within 1e-5 max-abs; the loaded parameters are
what the ranks held (bit for bit, each rank's expert rows at its offset); and for the trainer run,
against a single-process reference: the trainer starts from `torch.manual_seed(seed);
DeepseekV3(cfg)`, and two AdamW steps move each element by at most sum(lr) * (1 + wd), the
router biases by sum(gamma), which a misplaced expert or layer (distance ~0.1) cannot satisfy.
Corrupt folders are refused naming the file (tests/test_convert_streaming.py covers the cases).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from test_hf_conversion import hf_logits, ours_logits  # noqa: E402
from transformers import DeepseekV3ForCausalLM  # noqa: E402

from megads.checkpoint.dcp import read_meta, saved_keys, verify_folder  # noqa: E402
from megads.convert.checkpoint import load_model  # noqa: E402
from megads.convert.cli import main  # noqa: E402
from megads.model.transformer import DeepseekV3  # noqa: E402
from megads.parallel.executor import OptimSettings  # noqa: E402
from megads.testing.launch import run_trainer, trainer_env  # noqa: E402
from megads.testing.parallel import LayoutSpec, checkpoint_worker, make_batches, spawn, tiny_config  # noqa: E402

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
WORLD = 4
LAYOUT = LayoutSpec(2, 2, schedule="dualpipev")
OPTIM = OptimSettings(lr=1e-3, weight_decay=0.1, max_grad_norm=1.0, bias_update_speed=1e-3, bucket_numel=3000)


def _convert_cli(src: Path, dst: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "megads.convert.cli", "to-hf", str(src), str(dst)], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"wrote {dst}" in proc.stdout
    assert "to-hf" in proc.stderr  # the progress bar


def _max_logit_diff(model: DeepseekV3, hf_dir: Path) -> float:
    hf = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    return (ours_logits(model, ids) - hf_logits(hf, ids)).abs().max().item()


# ----------------------------------------------------------------------------- executor checkpoint
@pytest.fixture(scope="module")
def executor_step(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(step folder, folder of the ranks' results) of 2 steps under pp2 x ep2 DualPipeV."""
    root = tmp_path_factory.mktemp("executor")
    cfg = tiny_config()
    batches = make_batches(cfg, steps=STEPS, global_batch=8, seq_len=16)
    (root / "out").mkdir()
    spawn(WORLD, checkpoint_worker, cfg, LAYOUT, batches, 1, 0.3, OPTIM, SEED, str(root / "out"), 0, None,
          str(root / "ckpt"))
    step = root / "ckpt" / f"step_{STEPS:08d}"
    meta = read_meta(step)
    if "model" not in meta:  # the trainer records it (preflight.checkpoint_meta); the bare worker may not
        (step / "meta.json").write_text(json.dumps({**meta, "model": dataclasses.asdict(cfg)}))
    return step, root / "out"


def test_executor_checkpoint_to_hf_matches_transformers(executor_step: tuple[Path, Path], tmp_path: Path) -> None:
    step, out = executor_step
    verify_folder(step)
    keys = saved_keys(step)
    assert any(k.startswith("optim.") for k in keys) and "loader" in keys  # a full training state
    experts = keys["model.layers.1.mlp.experts.gate_up_proj.weight"]
    assert len(experts.chunks) == 2 and {c.offsets[0] for c in experts.chunks} == {0, 4}  # one box per ep rank
    _convert_cli(step, tmp_path / "hf")
    model = load_model(step)
    diff = _max_logit_diff(model, tmp_path / "hf")
    print(f"max |logit diff| megads (pp2 x ep2 DualPipeV checkpoint) vs transformers: {diff:.3e}")
    assert diff < TOL

    # what each rank held after its last step, at its expert offset, bit for bit
    state = model.state_dict()
    seen: set[str] = set()
    for rank in range(WORLD):
        result = torch.load(out / f"{LAYOUT.tag}.rank{rank}.pt", weights_only=False)
        for name, (t, start) in result["params"].items():
            held = state[name][start : start + t.shape[0]] if ".mlp.experts." in name else state[name]
            assert torch.equal(held, t), (rank, name)
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}


# ----------------------------------------------------------------------------- trainer checkpoints
def _train(run_dir: Path, *overrides: str, nproc: int) -> Path:
    """Run megads-train (torchrun for nproc > 1); return the final step folder."""
    run_trainer([*RUN, f"run_dir={run_dir}", *overrides], nproc=nproc)
    step = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert (step / "meta.json").is_file(), sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    return step


def _within_two_steps_of_init(model: DeepseekV3, step: Path) -> None:
    """Two AdamW steps from the seeded model move each element by at most sum(lr) * (1 + wd)."""
    meta = json.loads((step / "meta.json").read_text())
    history = [json.loads(line) for line in (step.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == STEPS
    param_bound = sum(h["lr"] for h in history) * (1 + meta["settings"]["optim.weight_decay"]) * 1.001
    bias_bound = sum(h["bias_update_speed"] for h in history) + 1e-6
    torch.manual_seed(SEED)
    init = DeepseekV3(model.cfg).state_dict()
    params = dict(model.named_parameters())
    for name, t in model.state_dict().items():
        dev = (t - init[name]).abs().max().item()
        assert dev <= (param_bound if name in params else bias_bound), (name, dev)
        if name in params:
            assert dev > 0, name  # trained: every tensor moved
    w = model.state_dict()["layers.1.mlp.experts.gate_up_proj.weight"]
    swapped = w[[1, 0, *range(2, w.shape[0])]]
    assert (swapped - init["layers.1.mlp.experts.gate_up_proj.weight"]).abs().max() > 10 * param_bound


def test_sharded_trainer_checkpoint_to_hf(tmp_path: Path) -> None:
    step = _train(tmp_path / "run", *SHARDED, nproc=WORLD)
    assert (step / ".metadata").is_file() and read_meta(step)["format"] == 2
    _convert_cli(step, tmp_path / "hf")
    model = load_model(step)
    diff = _max_logit_diff(model, tmp_path / "hf")
    print(f"max |logit diff| megads (trainer pp2 x ep2) vs transformers: {diff:.3e}")
    assert diff < TOL
    _within_two_steps_of_init(model, step)


def test_single_process_trainer_checkpoint_to_hf(tmp_path: Path) -> None:
    step = _train(tmp_path / "run", "parallel=single", nproc=1)
    assert main(["to-hf", str(step), str(tmp_path / "hf"), "--no-progress"]) == 0
    model = load_model(step)
    diff = _max_logit_diff(model, tmp_path / "hf")
    print(f"max |logit diff| megads (single process) vs transformers: {diff:.3e}")
    assert diff < TOL
    _within_two_steps_of_init(model, step)
