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
from megads.train.schedule import batch_granularity, plan_run, ramp_note


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
    assert ramp_note(cfg.schedule, gran=batch_granularity(schedule="1f1b", pp=1, micro_batch_size=1, dp=128)) is None
    # 2048 data-parallel ranks: the ramp's ends are rounded to multiples of 2048 (and logged), not refused
    validate_config(cfg, world_size=2048)
    note = ramp_note(cfg.schedule, gran=batch_granularity(schedule="1f1b", pp=1, micro_batch_size=1, dp=2048))
    assert note is not None and note.endswith("start 3072 -> 4096, end 15360 -> 14336")


# Every combination the docs and README present as a command (and the world size it runs on), dry-run:
# composed from conf/ with Hydra's compose API and validated without any process group.
DOCUMENTED = [
    ([], 4),  # make train, launch/local.sh 4, the main job (docs/training.md, README)
    (["parallel=deepseek_v3_2048", "schedule=pretrain", "model=deepseek_v3_671b", "seq_len=4096", "optim=adamw"],
     2048),  # the DeepSeek-V3 recipe on its layout (SPEC.md): start 3072 -> 4096, see docs/training.md
    (["model=deepseek_v3_671b", "schedule=pretrain", "optim=adamw", "seq_len=4096", "parallel.micro_batch_size=1"],
     4),  # docs/training.md "The DeepSeek-V3 pre-training run is"
    (["schedule.train_tokens=0", "schedule.train_steps=50"], 4),  # docs/training.md
    (["data=fallback", "logging.wandb.mode=disabled", "run_dir=/tmp/try"], 4),  # docs/training.md
    (["optim.lr=1e-3", "schedule.train_steps=10"], 4),  # one job of the sweep (docs/training.md, README)
    (["schedule.train_steps=50", "model=small"], 4),  # README: make train TRAIN_ARGS=...
    (["model=tiny", "parallel=dp"], 4),  # README: torchrun --nproc-per-node N ... parallel=dp
    (["parallel=pp2_ep2", "schedule.train_steps=50"], 4),  # docs/parallel.md, launch/local.sh
    (["parallel=pp2_ep2"], 8),  # docs/parallel.md: pp2 x ep2 x dp2
    (["parallel=pp2_ep2", "schedule.train_steps=1000"], 16),  # launch/slurm.sbatch: 2 nodes x 8 tasks
    (["parallel=pp2_ep2", "parallel.schedule=dualpipev", "parallel.micro_batch_size=1", "schedule.train_steps=30",
      "schedule.train_tokens=0"], 4),  # docs/training.md "Pipeline timeline and F&B overlap"
]


@pytest.mark.parametrize(("overrides", "world"), DOCUMENTED)
def test_documented_combinations_validate(overrides: list[str], world: int) -> None:
    validate_config(_compose(*overrides), world_size=world)


def test_deepseek_v3_2048_recipe_rounds_its_ramp_to_dualpipe() -> None:
    """DualPipe at pp 16 needs an even number >= 32 of micro-batches per dp rank (dp 128): the
    recipe's 3072 sequences (24 per rank) are raised to 4096, every later ramp value is even."""
    cfg = _compose("parallel=deepseek_v3_2048", "schedule=pretrain", "model=deepseek_v3_671b", "seq_len=4096",
                   "optim=adamw")
    assert (cfg.parallel.pp, cfg.parallel.schedule, cfg.parallel.micro_batch_size) == (16, "dualpipe", 1)
    assert cfg.parallel.data_parallel_size(world_size=2048) == 128
    validate_config(cfg, world_size=2048)
    gran = batch_granularity(schedule="dualpipe", pp=16, micro_batch_size=1, dp=128)
    assert ramp_note(cfg.schedule, gran=gran) == (
        "batch ramp rounded to dualpipe's granularity (pp=16, micro-batch 1 x dp 128: an even number >= 32 of "
        "micro-batches per dp rank = multiples of 256 sequences, at least 4096): start 3072 -> 4096"
    )
    batches = plan_run(cfg.schedule, seq_len=4096, gran=gran).batches
    assert batches[0] == 4096 and batches[-1] == 15360 and all(b % 256 == 0 for b in batches)


def test_model_presets() -> None:
    big = _compose("model=deepseek_v3_671b").model
    assert big == ModelConfig()  # the public config (the dataclass defaults)
    pc = count_parameters(big)
    assert abs(pc.total / 671e9 - 1) < 0.01 and abs(pc.activated / 37e9 - 1) < 0.02
    small = count_parameters(_compose("model=small").model)
    assert 100e6 <= small.total <= 300e6


YARN_CLI = "{type:yarn,factor:4.0,original_max_position_embeddings:64,beta_fast:32,beta_slow:1,mscale:1.0,mscale_all_dim:1.0}"


def test_rope_scaling_is_settable_from_the_command_line() -> None:
    """Issue 13, item 0: a whole YaRN dict, or field by field, merges into the presets' plain-RoPE
    node (`{type: none}` -> None); `null` still switches it off."""
    from megads.model.config import RopeScalingConfig

    assert _compose("model=tiny").model.rope_scaling is None
    whole = _compose("model=tiny", f"model.rope_scaling={YARN_CLI}").model
    assert whole.rope_scaling == RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=64,
                                                   beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    whole.validate()
    by_field = _compose("model=small", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=8").model
    assert by_field.rope_scaling == RopeScalingConfig(type="yarn", factor=8.0)
    assert by_field.softmax_scale() > by_field.replace(rope_scaling=None).softmax_scale()  # mscale^2 > 1
    assert _compose("model=tiny", f"model.rope_scaling={YARN_CLI}", "model.rope_scaling=null").model.rope_scaling is None


@pytest.mark.parametrize("override", ["model.rope_scaling={type:yarn,factr:4}", "model.rope_scaling.factr=4"])
def test_rope_scaling_refuses_a_wrong_key_by_name(override: str) -> None:
    with pytest.raises(ConfigCompositionException) as e:
        _compose("model=tiny", override)
    assert "Key 'factr' not in 'RopeScalingConfig'" in str(e.value.__cause__)


def test_rope_scaling_of_an_unknown_type_is_refused() -> None:
    cfg = _compose("model=tiny", "model.rope_scaling.type=linear").model
    with pytest.raises(ValueError, match="model.rope_scaling.type='linear': only 'yarn' is supported"):
        cfg.validate()


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
        (["schedule.batch_start=6", "schedule.batch_end=6"], 4,
         "schedule.batch_end=6 sequences is below the smallest global batch"),  # dualpipev pp2, dp 2: >= 8
        (["parallel.micro_batch_size=3"], 4, "raise schedule.batch_end (and batch_start) to at least 24"),
        (["parallel=pp2_ep2", "parallel.schedule=dualpipe", "schedule.batch_end=12"], 4, "at least 16"),
        (["parallel=pp2_ep2", "parallel.schedule=interleaved", "parallel.micro_batch_size=1",
          "schedule.batch_start=1", "schedule.batch_end=3"], 4, "multiples of 4 sequences, at least 4"),
        (["schedule.batch_start=0"], 4, "schedule.batch_start=0 sequences must be >= 1"),
        (["parallel.pp=3"], 4, "not divisible by parallel.pp=3"),
        (["parallel=dp", "schedule.train_tokens=1e5"], 1, "set exactly one of them"),
        (["parallel=dp", "schedule.batch_end=4", "schedule.batch_start=8"], 1,
         "batch_end=4 must be >= schedule.batch_start=8"),
        (["parallel=dp", "schedule.warmup_steps=5000"], 1, "raise constant_tokens or lower warmup_steps"),
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
        [sys.executable, "-m", "megads.train.cli", "parallel=dp", "parallel.micro_batch_size=32",
         f"run_dir={tmp_path}/r"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "micro-batch 32 x dp 1" in proc.stderr and "at least 32" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["+optim.lrr=1", "++optim.lrr=1"])
def test_cli_refuses_keys_added_with_plus(tmp_path, override: str) -> None:
    """Hydra's `optim.lrr=1` error suggests `+optim.lrr=1`; that must fail too, naming the key."""
    proc = subprocess.run(
        [sys.executable, "-m", "megads.train.cli", override, "parallel=dp", f"run_dir={tmp_path}/r"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "unknown key optim.lrr (did you mean optim.lr?)" in proc.stderr
    assert "optim (OptimConfig) has: name, lr, min_lr_ratio" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["+bogus=1", "+logging.wandb.bogus=1", "++schedule.lr_tails.0.bogus=1"])
def test_added_keys_fail_everywhere_in_the_schema(override: str) -> None:
    with pytest.raises(ConfigError, match="unknown key .*bogus"):
        _compose(override)


def test_added_data_keys_fail_in_the_data_schema() -> None:
    """`data` is untyped at composition: `+data.x` composes, the data schema refuses unknown keys."""
    cfg = _compose("+data.bogus=1")
    with pytest.raises(ConfigError, match="bogus"):
        validate_config(cfg, world_size=4)
    cfg = _compose("data=fallback", "+data.max_bytez=3")
    with pytest.raises(ConfigError, match="max_bytez"):
        validate_config(cfg, world_size=4)
    validate_config(_compose("data=fallback", "++data.max_bytes=300000"), world_size=4)  # a known key


def test_fallback_loader_resumes_exactly() -> None:
    cfg = FallbackDataConfig(max_bytes=20_000)
    kw = dict(seq_len=16, micro_batch_size=3, dp_size=2)
    a = ByteLoader(cfg, dp_rank=0, **kw)
    ref = [next(a)["input_ids"] for _ in range(700)]  # crosses epochs (~312 windows per rank)
    epoch3 = a.window_indices(3 * a.n_windows, a.n_windows)  # positions of epoch 3 in the global stream
    assert sorted(epoch3.tolist()) == list(range(a.n_windows))  # every window once per epoch
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


def test_too_few_microbatches_for_the_schedule_are_rounded_up_or_refused() -> None:
    """DualPipeV at pp=2 needs 2*pp micro-batches per rank: a ramp starting below is raised to the
    minimum (and logged); a ramp that ends below it is refused, saying what would fit."""
    cfg = _compose("parallel=pp2_ep2", "parallel.schedule=dualpipev")  # batch 8 / (2 x dp 2) = 2 < 4
    validate_config(cfg, world_size=4)
    gran = batch_granularity(schedule="dualpipev", pp=2, micro_batch_size=2, dp=2)
    assert ramp_note(cfg.schedule, gran=gran) == (
        "batch ramp rounded to dualpipev's granularity (pp=2, micro-batch 2 x dp 2: at least 4 micro-batches per "
        "dp rank = multiples of 4 sequences, at least 16): start 8 -> 16"
    )
    cfg = _compose("parallel=pp2_ep2", "parallel.schedule=dualpipev", "schedule.batch_end=12")
    with pytest.raises(ConfigError, match=r"batch_end=12 .*at least 4 micro-batches.*to at least 16"):
        validate_config(cfg, world_size=4)
    validate_config(_compose("parallel=pp2_ep2", "parallel.schedule=dualpipev", "parallel.micro_batch_size=1"),
                    world_size=4)
