"""Config composition and validation: presets load, typos and bad values fail with clear messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from megads.model import ModelConfig, count_parameters
from megads.train.cli import CONF_DIR
from megads.train.config import ConfigError, TrainConfig, register_configs, to_train_config, validate_config
from megads.train.data_source import resolve_data_config
from megads.train.fallback_data import ByteLoader, FallbackDataConfig


def _compose(*overrides: str) -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return to_train_config(compose("config", overrides=list(overrides)))


def test_default_config_is_valid_for_make_train() -> None:
    cfg = _compose()
    validate_config(cfg, world_size=4)  # `make train`: 4 ranks, no overrides
    assert cfg.model.vocab_size == 8192 and cfg.model.num_hidden_layers == 4
    assert cfg.model.topk_group < cfg.model.n_group and cfg.model.q_lora_rank is not None
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.1 and cfg.optim.clip_grad == 1.0
    resolve_data_config(cfg.data)


def test_pretrain_recipe_validates_for_a_cluster_layout() -> None:
    cfg = _compose("model=deepseek_v3_671b", "schedule=pretrain", "optim=adamw", "seq_len=4096",
                   "parallel=dp", "parallel.micro_batch_size=1")
    validate_config(cfg, world_size=128)  # 128 data-parallel ranks: 3072 and 15360 are multiples
    with pytest.raises(ConfigError, match="multiple of parallel.micro_batch_size"):
        validate_config(cfg, world_size=2048)


def test_model_presets() -> None:
    big = _compose("model=deepseek_v3_671b").model
    assert big == ModelConfig()  # the public config (the dataclass defaults)
    pc = count_parameters(big)
    assert abs(pc.total / 671e9 - 1) < 0.01 and abs(pc.activated / 37e9 - 1) < 0.02
    small = count_parameters(_compose("model=small").model)
    assert 100e6 <= small.total <= 300e6


@pytest.mark.parametrize("override", ["optim.bogus=1", "schedule.warmup=3", "model.hidden=3", "bogus=1"])
def test_unknown_key_fails(override: str) -> None:
    with pytest.raises(ConfigCompositionException):
        _compose(override)


def test_unknown_key_fails_outside_hydra() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        to_train_config({"logging": {"wandb": {"bogus": 1}}})
    with pytest.raises(ConfigError, match="max_bytez"):
        resolve_data_config({"kind": "fallback", "max_bytez": 3})


@pytest.mark.parametrize(
    ("overrides", "world", "fragment"),
    [
        (["schedule.batch_start=6"], 4, "schedule.batch_start=6 sequences must be a positive multiple"),
        (["parallel.micro_batch_size=3"], 4, "= 12"),
        (["parallel.pp=3"], 4, "not divisible by parallel.pp=3"),
        (["schedule.train_steps=10"], 1, "set exactly one of them"),
        (["schedule.batch_end=4", "schedule.batch_start=8"], 1, "batch_end=4 must be >= schedule.batch_start=8"),
        (["schedule.warmup_steps=5000"], 1, "raise constant_tokens or lower warmup_steps"),
        (["model.n_group=3"], 1, "n_group=3"),
        (["precision=fp16"], 1, "precision='fp16'"),
        (["optim.lr=0"], 1, "optim.lr=0.0 must be > 0"),
        (["seq_len=4096"], 1, "max_position_embeddings"),
    ],
)
def test_bad_values_name_the_field(overrides: list[str], world: int, fragment: str) -> None:
    cfg = _compose(*overrides)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, world_size=world)
    assert fragment in str(e.value)


def test_cli_reports_config_error_before_any_process_group(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "megads.train.cli", "parallel.micro_batch_size=3", f"run_dir={tmp_path}/r"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "parallel.micro_batch_size(3)" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_fallback_loader_resumes_exactly() -> None:
    cfg = FallbackDataConfig(max_bytes=20_000)
    kw = dict(seq_len=16, micro_batch_size=3, dp_size=2)
    a = ByteLoader(cfg, dp_rank=0, **kw)
    b_other = ByteLoader(cfg, dp_rank=1, **kw)
    ref = [next(a)["input_ids"] for _ in range(700)]  # crosses epochs (~312 windows per rank)
    mine, theirs = set(a._rank_order(3).tolist()), set(b_other._rank_order(3).tolist())
    assert not mine & theirs and len(mine) == len(theirs) == a.n_windows // 2  # disjoint rank shards
    c = ByteLoader(cfg, dp_rank=0, **kw)
    for _ in range(250):
        next(c)
    d = ByteLoader(cfg, dp_rank=0, **kw)
    d.load_state_dict(c.state_dict())
    for i in range(250, 700):
        assert (next(d)["input_ids"] == ref[i]).all()
    batch = next(ByteLoader(cfg, dp_rank=0, **kw))
    assert (batch["input_ids"][:, 1:] == batch["labels"][:, :-1]).all()


def test_data_errors_are_reported_by_validate_config() -> None:
    cfg = _compose("data=fallback", "data.max_bytes=10")
    with pytest.raises(ConfigError, match="data.max_bytes=10"):
        validate_config(cfg, world_size=1)
    cfg = _compose("data.fim_rate=2")  # the built-in pipeline's own validation
    with pytest.raises(ConfigError, match="data.fim_rate=2"):
        validate_config(cfg, world_size=1)


def test_resume_fingerprint_covers_model_data_and_shapes_only() -> None:
    from megads.train.trainer import run_fingerprint

    def fp(*overrides: str) -> str:
        cfg = _compose("data=fallback", *overrides)
        return run_fingerprint(cfg, resolve_data_config(cfg.data))

    base = fp()
    assert base == fp("schedule.train_tokens=1e6", "optim.lr=1e-3", "logging.console_every=3")
    for change in ("seq_len=64", "model.hidden_size=32", "data.max_bytes=5000", "parallel.micro_batch_size=4"):
        assert fp(change) != base, change


def test_wandb_modes_and_failures_never_raise(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import wandb

    from megads.train.config import WandbConfig
    from megads.train.monitor import WandbLogger, resolve_wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "offline"  # no API key
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode(WandbConfig(mode="auto")) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")  # the environment wins
    assert resolve_wandb_mode(WandbConfig(mode="online")) == "disabled"
    w = WandbLogger(WandbConfig(), run_dir=tmp_path, run_name="t", config={})
    assert w.run is None and not (tmp_path / "wandb").exists()

    def boom(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(UserWarning, match="wandb init failed"):
        w = WandbLogger(WandbConfig(), run_dir=tmp_path, run_name="t", config={})
    w.log({"loss": 1.0}, step=1)  # no-ops, no exception
    w.finish()
    assert w.run is None


def test_too_few_microbatches_for_the_schedule_fail_before_the_run() -> None:
    """DualPipeV at pp=2 needs 2*pp micro-batches per rank; the message says how to get there."""
    cfg = _compose("parallel=pp2_ep2", "parallel.schedule=dualpipev")  # batch 8 / (2 x dp 2) = 2 < 4
    with pytest.raises(ConfigError, match=r"needs at least 4 micro-batches.*raise batch_start to 16"):
        validate_config(cfg, world_size=4)
    validate_config(_compose("parallel=pp2_ep2", "parallel.schedule=dualpipev", "parallel.micro_batch_size=1"),
                    world_size=4)
