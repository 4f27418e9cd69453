"""Bad configs (issue 16, item 4): 60+ invalid configs, each refused before any process group
starts, with a message that names its field.

Each case goes through what a user runs: Hydra's composition of conf/ with the overrides (wrong
types and unknown keys fail there), then `train()` itself with `init_distributed` replaced by a
function that fails the test, so every refusal is proven to come before a process group. The
world size of a case is given through the launcher's variables (RANK / WORLD_SIZE), as torchrun
sets them. The message must contain the field's name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException

import megads.train.trainer as trainer_mod
from megads.train.config import ConfigError

BASE = ["model=tiny", "parallel=single", "seq_len=32", "schedule=tiny", "schedule.train_tokens=0",
        "schedule.train_steps=4", "schedule.batch_start=4", "schedule.batch_end=4", "data=fallback",
        "data.max_bytes=200000", "logging.wandb.mode=disabled"]
YARN = "model.rope_scaling.type=yarn"

CASES: list[tuple[str, list[str], int, str]] = [  # (id, overrides, world size, field named)
    # wrong types
    ("type-seq_len", ["seq_len=abc"], 1, "seq_len"),
    ("type-lr", ["optim.lr=fast"], 1, "optim.lr"),
    ("type-pp", ["parallel.pp=two"], 1, "parallel.pp"),
    ("type-hidden", ["model.hidden_size=1.5"], 1, "model.hidden_size"),
    ("type-steps", ["schedule.train_steps=ten"], 1, "schedule.train_steps"),
    ("type-every", ["checkpoint.every_steps=[1]"], 1, "checkpoint.every_steps"),
    ("type-zero1", ["parallel.zero1=maybe"], 1, "parallel.zero1"),
    ("type-console", ["logging.console_every=x"], 1, "logging.console_every"),
    ("type-chunk", ["memory.loss_chunk_tokens=x"], 1, "memory.loss_chunk_tokens"),
    ("type-skips", ["guards.max_consecutive_skips=x"], 1, "guards.max_consecutive_skips"),
    ("type-factor", ["model.rope_scaling.factor=big"], 1, "model.rope_scaling.factor"),
    # unknown keys
    ("key-optim", ["optim.bogus=1"], 1, "bogus"),
    ("key-model", ["model.hidden=3"], 1, "hidden"),
    ("key-parallel", ["parallel.tp=2"], 1, "tp"),
    ("key-schedule", ["schedule.warmup=3"], 1, "warmup"),
    ("key-checkpoint", ["checkpoint.resume_from=x"], 1, "resume_from"),
    ("key-memory", ["memory.offload=true"], 1, "offload"),
    ("key-rope", ["model.rope_scaling.factr=2"], 1, "factr"),
    ("key-guards", ["guards.spike=2"], 1, "spike"),
    # values out of range
    ("lr-zero", ["optim.lr=0"], 1, "optim.lr"),
    ("lr-negative", ["optim.lr=-1"], 1, "optim.lr"),
    ("min-lr", ["optim.min_lr_ratio=2"], 1, "optim.min_lr_ratio"),
    ("betas-one", ["optim.betas=[0.9]"], 1, "optim.betas"),
    ("betas-range", ["optim.betas=[1.0,0.9]"], 1, "optim.betas"),
    ("eps", ["optim.eps=0"], 1, "optim.eps"),
    ("wd", ["optim.weight_decay=-0.1"], 1, "optim.weight_decay"),
    ("clip", ["optim.clip_grad=-1"], 1, "optim.clip_grad"),
    ("optimizer", ["optim.name=sgd"], 1, "optim.name"),
    ("precision", ["precision=fp16"], 1, "precision"),
    ("fp8-backend", ["precision=fp8", "fp8.backend=fp4"], 1, "fp8.backend"),
    ("fp8-te-on-cpu", ["precision=fp8", "fp8.backend=te", "device=cpu"], 1, "fp8.backend=te"),
    ("fp8-dispatch-scales", ["precision=fp8", "fp8.pow2_scales=false"], 1, "fp8.dispatch"),
    ("device", ["device=tpu"], 1, "device"),
    ("seq-short", ["seq_len=1"], 1, "seq_len"),
    ("warmup", ["schedule.warmup_steps=-1"], 1, "schedule.warmup_steps"),
    ("decay", ["schedule.decay_tokens=-5"], 1, "decay_tokens"),
    ("length", ["schedule.train_steps=0"], 1, "schedule.train_tokens"),
    ("length-both", ["schedule.train_tokens=1000"], 1, "schedule.train_steps"),
    ("batch-zero", ["schedule.batch_start=0"], 1, "schedule.batch_start"),
    ("batch-order", ["schedule.batch_end=2"], 1, "schedule.batch_end"),
    ("bias-speed", ["schedule.bias_update_speed=-1"], 1, "bias_update_speed"),
    ("lr-tail", ["schedule.lr_tails=[{tokens:0,lr:1e-4}]"], 1, "schedule.lr_tails"),
    ("console", ["logging.console_every=0"], 1, "logging.console_every"),
    ("wandb-mode", ["logging.wandb.mode=maybe"], 1, "logging.wandb.mode"),
    ("keep-last", ["checkpoint.keep_last=-1"], 1, "keep_last"),
    ("verify", ["checkpoint.verify=md5"], 1, "checkpoint.verify"),
    ("init-from", ["checkpoint.init_from=/nonexistent/step"], 1, "checkpoint.init_from"),
    ("recompute", ["memory.recompute=some"], 1, "memory.recompute"),
    ("chunk", ["memory.loss_chunk_tokens=-1"], 1, "memory.loss_chunk_tokens"),
    ("spike", ["guards.loss_spike_factor=0.5"], 1, "guards.loss_spike_factor"),
    ("skips", ["guards.max_consecutive_skips=0"], 1, "guards.max_consecutive_skips"),
    ("timeout", ["parallel.collective_timeout_s=0"], 1, "parallel.collective_timeout_s"),
    ("moments", ["parallel.moments_dtype=float16"], 1, "parallel.moments_dtype"),
    ("backend", ["parallel.backend=mpi"], 1, "parallel.backend"),
    ("micro-batch", ["parallel.micro_batch_size=0"], 1, "parallel.micro_batch_size"),
    ("bucket", ["parallel.bucket_numel=0"], 1, "parallel.bucket_numel"),
    ("schedule-name", ["parallel.schedule=gpipe2"], 1, "parallel.schedule"),
    ("node-limit", ["parallel.node_limit=0"], 1, "parallel.node_limit"),
    # impossible layouts
    ("pp-world", ["parallel.pp=2"], 1, "parallel.pp"),
    ("ep-dp", ["parallel.ep=4"], 2, "does not divide the data-parallel size"),
    ("ep-experts", ["parallel.ep=3", "parallel.pp=1"], 6, "model.n_routed_experts"),
    ("stage-layers", ["parallel.stage_layers=[1,1]"], 1, "parallel.stage_layers"),
    ("stage-layers-sum", ["parallel=pp2_ep2", "parallel.stage_layers=[1,1]"], 4, "parallel.stage_layers"),
    ("ranks-per-node", ["parallel=pp2_ep2", "parallel.ranks_per_node=3"], 4, "ranks_per_node"),
    ("cp-world", ["parallel=dp", "parallel.cp=3"], 4, "parallel.cp=3"),
    ("cp-seq-len", ["parallel=dp", "parallel.cp=2", "seq_len=30"], 2, "multiple of 4"),
    ("cp-compile", ["parallel=dp", "parallel.cp=2", "compile=true"], 2, "compile=true with parallel.cp=2"),
    # schedule / micro-batch clashes
    ("dualpipev-batch", ["parallel=dualpipev_pp2_ep2", "schedule.batch_start=2", "schedule.batch_end=2"], 4,
     "schedule.batch_end"),
    ("batch-dp", ["parallel=dp", "schedule.batch_start=3", "schedule.batch_end=3", "parallel.micro_batch_size=2"], 2,
     "schedule.batch_end"),
    # the model
    ("rope-dim", ["model.qk_rope_head_dim=3"], 1, "model.qk_rope_head_dim"),
    ("groups", ["model.n_group=3"], 1, "n_group"),
    ("topk-group", ["model.topk_group=9"], 1, "model.topk_group"),
    ("experts-per-token", ["model.num_experts_per_tok=100"], 1, "model.num_experts_per_tok"),
    ("scoring", ["model.scoring_func=softmax"], 1, "model.scoring_func"),
    ("dense-layers", ["model.first_k_dense_replace=99"], 1, "model.first_k_dense_replace"),
    ("rope-type", ["model.rope_scaling.type=linear"], 1, "model.rope_scaling.type"),
    ("rope-factor", [YARN, "model.rope_scaling.factor=0.5"], 1, "model.rope_scaling.factor"),
    ("act", ["model.hidden_act=gelu"], 1, "model.hidden_act"),
    # beyond the model's positions
    ("positions", ["seq_len=100000"], 1, "max_position_embeddings"),
    # stages
    ("stage-start", ["stages=tiny_extension", "stages.start=nope"], 1, "stages.start"),
    ("stage-skip", ["stages=tiny_extension", "stages.start=ext512"], 1, "checkpoint.init_from"),
]


def _message(overrides: list[str], world: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from megads.train.cli import compose_config as compose

    try:
        cfg = compose([*BASE, f"run_dir={tmp_path / 'run'}", *overrides])
    except ConfigCompositionException as e:
        return f"{e} {e.__cause__}"

    def refuse(**_: Any) -> None:
        raise AssertionError("the launch reached init_distributed: the error came too late")

    monkeypatch.setattr(trainer_mod, "init_distributed", refuse)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        trainer_mod.train(cfg)
    return str(e.value)


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 50 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("overrides, world, field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_refused_naming_its_field(
    overrides: list[str], world: int, field: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = _message(overrides, world, tmp_path, monkeypatch)
    assert field in message, message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())  # nothing written
