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
rounded down to the layout's `BatchGranularity`, batch_end after the ramp. The granularity is
what every step of the configured pipeline schedule can run: a global batch is micro_batch_size x
dp x M sequences, and M (micro-batches per data-parallel rank) must be a count the schedule
accepts (`pipeline.schedules.validate_microbatches`, the schedule registry's rule): any M for 1F1B / ZB1P, M >= 2 pp for
DualPipeV, an even M >= 2 pp for DualPipe, a multiple of pp for interleaved. So every ramp value
is a multiple of `multiple` sequences and at least `minimum`; the ramp runs from batch_start
rounded up to a valid value to batch_end rounded down to one (`ramp_bounds`), and `ramp_note`
is the start-of-run log line when that moved either end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megads.pipeline.schedules import microbatch_multiple, min_microbatches, validate_microbatches
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


@dataclass(frozen=True)
class BatchGranularity:
    """The global batches (sequences) a layout and its pipeline schedule can run."""

    multiple: int  # every global batch is a multiple of this many sequences
    minimum: int  # and at least this many (a multiple of `multiple`)
    per_microbatch: int  # micro_batch_size x dp: sequences of one micro-batch on every dp rank
    reason: str  # where the numbers come from, for the log and error messages
    schedule: str  # the schedule the rule is for ("none" without pipelining)


def batch_granularity(*, schedule: str, pp: int, micro_batch_size: int, dp: int) -> BatchGranularity:
    """The granularity of global batches for `schedule` on pp stages x dp data-parallel ranks.

    pp = 1 means no pipeline (the executor runs forward then backward per micro-batch): any
    number of micro-batches. Raises ValueError when the schedule cannot run on pp ranks at all.
    """
    per = micro_batch_size * dp
    head = f"micro-batch {micro_batch_size} x dp {dp}"
    if pp == 1:
        return BatchGranularity(multiple=per, minimum=per, per_microbatch=per,
                                reason=f"{head}: multiples of {per} sequences", schedule="none")
    step = microbatch_multiple(schedule, pp=pp)
    lo = -(-min_microbatches(schedule, pp=pp) // step) * step
    validate_microbatches(schedule, pp=pp, num_microbatches=lo)  # the layout itself (pp even, ...)
    if step == 1:
        count = f"at least {lo}" if lo > 1 else "any number of"
    elif step == 2:
        count = f"an even number >= {lo} of"
    else:
        count = f"a multiple of {step} (>= {lo})"
    return BatchGranularity(
        multiple=step * per, minimum=lo * per, per_microbatch=per, schedule=schedule,
        reason=(f"pp={pp}, {head}: {count} micro-batches per dp rank = multiples of {step * per} sequences, "
                f"at least {lo * per}"),
    )


def ramp_bounds(sched: ScheduleConfig, *, gran: BatchGranularity) -> tuple[int, int]:
    """(first, last) global batch of the ramp: batch_start rounded up and batch_end rounded down
    to valid values (the first never above the last). ValueError when no valid batch is <= batch_end."""
    m = gran.multiple
    last = sched.batch_end // m * m
    if last < gran.minimum:
        raise ValueError(
            f"schedule.batch_end={sched.batch_end} sequences is below the smallest global batch the layout runs "
            f"({gran.schedule if gran.schedule != 'none' else 'no pipeline'}: {gran.reason}); raise "
            f"schedule.batch_end (and batch_start) to at least {gran.minimum}, or lower parallel.micro_batch_size "
            f"or the number of data-parallel ranks"
        )
    first = max(gran.minimum, -(-sched.batch_start // m) * m)
    return min(first, last), last


def ramp_note(sched: ScheduleConfig, *, gran: BatchGranularity) -> str | None:
    """The start-of-run log line when the ramp's ends were moved to valid values, else None."""
    first, last = ramp_bounds(sched, gran=gran)
    moved = [f"{name} {was} -> {now}" for name, was, now in
             (("start", sched.batch_start, first), ("end", sched.batch_end, last)) if was != now]
    if not moved:
        return None
    whose = f"{gran.schedule}'s" if gran.schedule != "none" else "the data-parallel layout's"
    return f"batch ramp rounded to {whose} granularity ({gran.reason}): " + ", ".join(moved)


def global_batch_at(*, tokens: float, sched: ScheduleConfig, gran: BatchGranularity) -> int:
    """Global batch in sequences for the step starting after `tokens` consumed tokens."""
    first, last = ramp_bounds(sched, gran=gran)
    if sched.batch_ramp_tokens <= 0 or tokens >= sched.batch_ramp_tokens:
        return last
    raw = sched.batch_start + (sched.batch_end - sched.batch_start) * tokens / sched.batch_ramp_tokens
    return min(last, max(first, int(raw) // gran.multiple * gran.multiple))


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
    batches: tuple[int, ...]  # the distinct global batches the run steps through, ascending


def plan_run(sched: ScheduleConfig, *, seq_len: int, gran: BatchGranularity) -> RunPlan:
    """Replay the batch ramp: number of steps (train_steps, or until train_tokens are consumed)."""
    tokens, step = 0.0, 0
    first, last = ramp_bounds(sched, gran=gran)
    warmup_end = 0.0 if sched.warmup_steps == 0 else math.nan
    ramp_end = 0 if first == last else -1
    batches: set[int] = set()
    while (step < sched.train_steps) if sched.train_steps > 0 else (tokens < sched.train_tokens):
        if tokens >= sched.batch_ramp_tokens:  # constant batch from here: jump to the end
            per_step = last * seq_len
            batches.add(last)
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
        batch = global_batch_at(tokens=tokens, sched=sched, gran=gran)
        batches.add(batch)
        tokens += batch * seq_len
        step += 1
        if step == sched.warmup_steps:
            warmup_end = tokens
    if math.isnan(warmup_end):
        warmup_end = tokens
    return RunPlan(
        total_steps=step, total_tokens=tokens, warmup_end_tokens=warmup_end,
        ramp_end_step=ramp_end if ramp_end >= 0 else step, batches=tuple(sorted(batches)),
    )
