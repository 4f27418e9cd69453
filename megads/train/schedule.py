"""Token-based schedules: learning rate, global batch ramp, bias-update speed, MTP weight.

All functions are pure: they take the optimizer step about to run (0-based) and the number
of tokens consumed before it, and return that step's value. `plan_run` replays the batch ramp
to derive the number of steps of a run; the trainer loops exactly that many steps.

Learning rate (DeepSeek-V3, SPEC.md), with peak P = optim.lr and m = P * optim.min_lr_ratio:

    step < warmup_steps                   P * (step + 1) / warmup_steps
    tokens < C = constant_tokens          P
    C <= tokens < C + decay_tokens        m + (P - m) * (1 + cos(pi * (tokens - C) / decay_tokens)) / 2
    then each lr_tails stage in turn      its lr for its tokens (the last one holds afterwards)

Global batch (sequences): batch_start + (batch_end - batch_start) * tokens / batch_ramp_tokens,
rounded down to a multiple of micro_batch_size * data-parallel size, batch_end after the ramp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megads.train.config import ScheduleConfig


def lr_at(*, step: int, tokens: float, peak: float, min_ratio: float, sched: ScheduleConfig) -> float:
    if step < sched.warmup_steps:
        return peak * (step + 1) / sched.warmup_steps
    if tokens < sched.constant_tokens:
        return peak
    into = tokens - sched.constant_tokens
    floor = peak * min_ratio
    if into < sched.decay_tokens:
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * into / sched.decay_tokens))
    into -= sched.decay_tokens
    for stage in sched.lr_tails:
        if into < stage.tokens:
            return stage.lr
        into -= stage.tokens
    return sched.lr_tails[-1].lr if sched.lr_tails else floor


def global_batch_at(*, tokens: float, sched: ScheduleConfig, multiple: int) -> int:
    """Global batch in sequences for the step starting after `tokens` consumed tokens."""
    if sched.batch_ramp_tokens <= 0 or tokens >= sched.batch_ramp_tokens:
        return sched.batch_end
    raw = sched.batch_start + (sched.batch_end - sched.batch_start) * tokens / sched.batch_ramp_tokens
    return max(sched.batch_start, int(raw) // multiple * multiple)


def bias_update_speed_at(*, tokens: float, sched: ScheduleConfig) -> float:
    return sched.bias_update_speed if tokens < sched.bias_update_stop_tokens else 0.0


def mtp_weight_at(*, tokens: float, sched: ScheduleConfig) -> float:
    return sched.mtp_weight if tokens < sched.mtp_weight_switch_tokens else sched.mtp_weight_after


@dataclass
class RunPlan:
    total_steps: int
    total_tokens: float
    warmup_end_tokens: float  # tokens consumed when the warmup ends
    ramp_end_step: int  # first step that runs at batch_end


def plan_run(sched: ScheduleConfig, *, seq_len: int, multiple: int) -> RunPlan:
    """Replay the batch ramp: number of steps (train_steps, or until train_tokens are consumed)."""
    tokens, step = 0.0, 0
    warmup_end = 0.0 if sched.warmup_steps == 0 else math.nan
    ramp_end = 0 if sched.batch_start == sched.batch_end else -1
    while (step < sched.train_steps) if sched.train_steps > 0 else (tokens < sched.train_tokens):
        if tokens >= sched.batch_ramp_tokens:  # constant batch from here: jump to the end
            per_step = sched.batch_end * seq_len
            if ramp_end < 0:
                ramp_end = step
            if sched.train_steps > 0:
                remaining = sched.train_steps - step
            else:
                remaining = math.ceil((sched.train_tokens - tokens) / per_step)
            if math.isnan(warmup_end) and step + remaining >= sched.warmup_steps:
                warmup_end = tokens + (sched.warmup_steps - step) * per_step
            step += remaining
            tokens += remaining * per_step
            break
        tokens += global_batch_at(tokens=tokens, sched=sched, multiple=multiple) * seq_len
        step += 1
        if step == sched.warmup_steps:
            warmup_end = tokens
    if math.isnan(warmup_end):
        warmup_end = tokens
    return RunPlan(
        total_steps=step, total_tokens=tokens, warmup_end_tokens=warmup_end,
        ramp_end_step=ramp_end if ramp_end >= 0 else step,
    )
