"""Token schedules against the numbers of SPEC.md and a brute-force replay.

The pretrain preset is loaded through Hydra (conf/schedule/pretrain.yaml, conf/optim/adamw.yaml),
so the test checks the shipped YAML as well as the formulas.
"""

from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from megads.pipeline.schedules import SCHEDULES, build_schedule, validate_microbatches

from megads.train.cli import CONF_DIR
from megads.train.config import ScheduleConfig, TrainConfig, register_configs, to_train_config
from megads.train.schedule import (
    BatchGranularity,
    batch_granularity,
    bias_update_speed_at,
    global_batch_at,
    lr_at,
    mtp_weight_at,
    plan_run,
    ramp_bounds,
    ramp_note,
)

T = 1e12
B = 1e9


def _dp(per: int) -> BatchGranularity:
    """No pipeline: global batches in multiples of micro_batch_size x dp = `per` sequences."""
    return batch_granularity(schedule="1f1b", pp=1, micro_batch_size=1, dp=per)


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
    g = _dp(128)
    assert global_batch_at(tokens=0, sched=s, gran=g) == 3072
    assert global_batch_at(tokens=469 * B, sched=s, gran=g) == 15360
    assert global_batch_at(tokens=1 * T, sched=s, gran=g) == 15360
    assert global_batch_at(tokens=469 * B / 2, sched=s, gran=g) == 9216  # (3072 + 15360) / 2
    prev = 0
    for i in range(101):
        for mult in (128, 96, 1024):
            b = global_batch_at(tokens=469 * B * i / 100, sched=s, gran=_dp(mult))
            assert 3072 <= b <= 15360 and b % mult == 0
        b = global_batch_at(tokens=469 * B * i / 100, sched=s, gran=g)
        assert b >= prev  # non-decreasing
        raw = 3072 + (15360 - 3072) * i / 100
        assert raw - 128 < b <= raw + 1e-6  # rounded down to the multiple
        prev = b


def test_microbatch_rule_matches_the_generators() -> None:
    """`validate_microbatches` (used by validate_config) accepts exactly what the generators build."""
    for name in SCHEDULES:
        for pp in range(1, 6):
            for m in range(0, 2 * pp + 7):
                try:
                    build_schedule(name, pp=pp, num_microbatches=m)
                    built = True
                except ValueError:
                    built = False
                try:
                    validate_microbatches(name, pp=pp, num_microbatches=m)
                    accepted = True
                except ValueError:
                    accepted = False
                assert built == accepted, (name, pp, m)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_accepts_every_ramp_value(name: str) -> None:
    """A ramp crossing odd micro-batch counts: every global batch it yields is one the schedule builds.

    (Issue 9: DualPipe and interleaved 1F1B died mid-run at 5 micro-batches per rank.)
    """
    for pp in (2, 4):
        for mb, dp in ((1, 2), (2, 1), (1, 3)):
            per = mb * dp
            g = batch_granularity(schedule=name, pp=pp, micro_batch_size=mb, dp=dp)
            lo_m = {"1f1b": 1, "zb1p": 1, "interleaved": pp, "dualpipe": 2 * pp, "dualpipev": 2 * pp}[name]
            assert g.minimum == lo_m * per and g.per_microbatch == per
            assert g.multiple == {"interleaved": pp, "dualpipe": 2}.get(name, 1) * per
            # raw ramp from an odd count below the minimum to an odd count above it
            s = ScheduleConfig(batch_start=per * (lo_m - 1) + 1, batch_end=per * (lo_m + 2 * pp + 3) + 1,
                               batch_ramp_tokens=2_000, warmup_steps=1, train_tokens=0, train_steps=300)
            raw_counts = {int(s.batch_start + (s.batch_end - s.batch_start) * t / 2_000) // per
                          for t in range(0, 2_000, 5)}
            assert any(c % 2 for c in raw_counts)  # the raw ramp crosses odd counts
            plan = plan_run(s, seq_len=8, gran=g)
            first, last = ramp_bounds(s, gran=g)
            assert plan.batches[0] == first and plan.batches[-1] == last and len(plan.batches) >= 3
            tokens, prev = 0.0, 0
            for _ in range(plan.total_steps):
                b = global_batch_at(tokens=tokens, sched=s, gran=g)
                assert b in plan.batches and b >= prev and b % per == 0
                prev = b
                tokens += b * 8
            for b in plan.batches:
                build_schedule(name, pp=pp, num_microbatches=b // per)  # the generator itself accepts it


def test_deepseek_v3_2048_granularity_and_note(pretrain: TrainConfig) -> None:
    """DualPipe at pp 16 / dp 128 with one-sequence micro-batches cannot run 3072 sequences (24 per rank)."""
    s = pretrain.schedule
    g = batch_granularity(schedule="dualpipe", pp=16, micro_batch_size=1, dp=128)
    assert (g.multiple, g.minimum) == (256, 4096)
    assert ramp_bounds(s, gran=g) == (4096, 15360)
    assert ramp_note(s, gran=g) == (
        "batch ramp rounded to dualpipe's granularity (pp=16, micro-batch 1 x dp 128: an even number >= 32 of "
        "micro-batches per dp rank = multiples of 256 sequences, at least 4096): start 3072 -> 4096"
    )
    assert ramp_note(s, gran=_dp(128)) is None  # nothing moved: no note
    plan = plan_run(s, seq_len=4096, gran=g)
    assert plan.batches == tuple(range(4096, 15360 + 1, 256))
    for b in plan.batches:
        validate_microbatches("dualpipe", pp=16, num_microbatches=b // 128)
    # an end below the schedule's minimum has no valid value
    with pytest.raises(ValueError, match=r"batch_end=4000 .* at least 4096"):
        ramp_bounds(ScheduleConfig(batch_start=3072, batch_end=4000), gran=g)


def test_bias_speed_and_mtp_weight(pretrain: TrainConfig) -> None:
    s = pretrain.schedule
    assert bias_update_speed_at(tokens=0, sched=s) == 0.001
    assert bias_update_speed_at(tokens=14.3 * T - 1, sched=s) == 0.001
    assert bias_update_speed_at(tokens=14.3 * T, sched=s) == 0.0  # 0 for the last 500B tokens
    assert mtp_weight_at(tokens=10 * T - 1, sched=s) == 0.3
    assert mtp_weight_at(tokens=10 * T, sched=s) == 0.1


def test_plan_run_matches_brute_force(pretrain: TrainConfig) -> None:
    s, seq = pretrain.schedule, 4096
    for g in (_dp(128), batch_granularity(schedule="dualpipe", pp=16, micro_batch_size=1, dp=128)):
        plan = plan_run(s, seq_len=seq, gran=g)
        tokens, steps, warm, seen = 0.0, 0, None, set()
        while tokens < s.train_tokens:
            b = global_batch_at(tokens=tokens, sched=s, gran=g)
            seen.add(b)
            tokens += b * seq
            steps += 1
            if steps == s.warmup_steps:
                warm = tokens
        assert (plan.total_steps, plan.total_tokens, plan.warmup_end_tokens) == (steps, tokens, warm)
        assert plan.batches == tuple(sorted(seen))
        assert 14.8 * T <= plan.total_tokens < 14.8 * T + 15360 * seq
    fixed = plan_run(ScheduleConfig(train_tokens=0, train_steps=5000), seq_len=seq, gran=_dp(128))
    assert fixed.total_steps == 5000
