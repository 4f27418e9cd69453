"""Token schedules against the numbers of SPEC.md and a brute-force replay.

The pretrain preset is loaded through Hydra (conf/schedule/pretrain.yaml, conf/optim/adamw.yaml),
so the test checks the shipped YAML as well as the formulas.
"""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir

from megads.train.cli import CONF_DIR
from megads.train.config import ScheduleConfig, TrainConfig, register_configs, to_train_config
from megads.train.schedule import bias_update_speed_at, global_batch_at, lr_at, mtp_weight_at, plan_run

T = 1e12
B = 1e9


@pytest.fixture(scope="module")
def pretrain() -> TrainConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("config", overrides=["schedule=pretrain", "optim=adamw", "seq_len=4096", "model=deepseek_v3_671b"])
    return to_train_config(cfg)


def _lr(cfg: TrainConfig, step: int, tokens: float) -> float:
    return lr_at(step=step, tokens=tokens, peak=cfg.optim.lr, min_ratio=cfg.optim.min_lr_ratio, sched=cfg.schedule)


def test_lr_at_spec_boundaries(pretrain: TrainConfig) -> None:
    peak = 2.2e-4
    assert pretrain.optim.lr == peak
    assert _lr(pretrain, 0, 0) == pytest.approx(peak / 2000)
    assert _lr(pretrain, 999, 1 * B) == pytest.approx(peak * 1000 / 2000)
    assert _lr(pretrain, 1999, 20 * B) == pytest.approx(peak)  # warmup end = peak
    assert _lr(pretrain, 2000, 20 * B) == pytest.approx(peak)
    assert _lr(pretrain, 100_000, 10 * T - 1) == pytest.approx(peak)  # constant until 10T
    assert _lr(pretrain, 100_000, 10 * T) == pytest.approx(peak)  # cosine starts at the peak
    mid = 10 * T + 4.3 * T / 2
    assert _lr(pretrain, 100_000, mid) == pytest.approx((peak + 2.2e-5) / 2)
    quarter = 10 * T + 4.3 * T / 4
    assert _lr(pretrain, 100_000, quarter) == pytest.approx(2.2e-5 + (peak - 2.2e-5) * (1 + math.cos(math.pi / 4)) / 2)
    assert _lr(pretrain, 100_000, 14.3 * T - 1e6) == pytest.approx(2.2e-5, rel=1e-6)  # cosine end = 2.2e-5
    assert _lr(pretrain, 100_000, 14.3 * T) == pytest.approx(2.2e-5)  # first tail
    assert _lr(pretrain, 100_000, 14.3 * T + 333 * B - 1) == pytest.approx(2.2e-5)
    assert _lr(pretrain, 100_000, 14.3 * T + 333 * B) == pytest.approx(7.3e-6)  # last 167B tokens
    assert _lr(pretrain, 100_000, 14.8 * T - 1) == pytest.approx(7.3e-6)
    assert _lr(pretrain, 100_000, 15 * T) == pytest.approx(7.3e-6)  # holds after the schedule
    # the cosine decreases monotonically
    vals = [_lr(pretrain, 100_000, 10 * T + f * 4.3 * T) for f in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


def test_batch_ramp(pretrain: TrainConfig) -> None:
    s = pretrain.schedule
    m = 128
    assert global_batch_at(tokens=0, sched=s, multiple=m) == 3072
    assert global_batch_at(tokens=469 * B, sched=s, multiple=m) == 15360
    assert global_batch_at(tokens=1 * T, sched=s, multiple=m) == 15360
    assert global_batch_at(tokens=469 * B / 2, sched=s, multiple=m) == 9216  # (3072 + 15360) / 2
    prev = 0
    for i in range(101):
        for mult in (128, 96, 1024):
            b = global_batch_at(tokens=469 * B * i / 100, sched=s, multiple=mult)
            assert 3072 <= b <= 15360 and (b % mult == 0 or b == 3072)
        b = global_batch_at(tokens=469 * B * i / 100, sched=s, multiple=m)
        assert b >= prev  # non-decreasing
        raw = 3072 + (15360 - 3072) * i / 100
        assert raw - m < b <= raw + 1e-6  # rounded down to the multiple
        prev = b


def test_bias_speed_and_mtp_weight(pretrain: TrainConfig) -> None:
    s = pretrain.schedule
    assert bias_update_speed_at(tokens=0, sched=s) == 0.001
    assert bias_update_speed_at(tokens=14.3 * T - 1, sched=s) == 0.001
    assert bias_update_speed_at(tokens=14.3 * T, sched=s) == 0.0  # 0 for the last 500B tokens
    assert mtp_weight_at(tokens=10 * T - 1, sched=s) == 0.3
    assert mtp_weight_at(tokens=10 * T, sched=s) == 0.1


def test_plan_run_matches_brute_force(pretrain: TrainConfig) -> None:
    s, seq, m = pretrain.schedule, 4096, 128
    plan = plan_run(s, seq_len=seq, multiple=m)
    tokens, steps, warm = 0.0, 0, None
    while tokens < s.train_tokens:
        tokens += global_batch_at(tokens=tokens, sched=s, multiple=m) * seq
        steps += 1
        if steps == s.warmup_steps:
            warm = tokens
    assert (plan.total_steps, plan.total_tokens, plan.warmup_end_tokens) == (steps, tokens, warm)
    assert 14.8 * T <= plan.total_tokens < 14.8 * T + 15360 * seq
    fixed = plan_run(ScheduleConfig(train_tokens=0, train_steps=5000), seq_len=seq, multiple=m)
    assert fixed.total_steps == 5000
