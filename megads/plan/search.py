"""Enumerate the valid layouts of a cluster, drop those that do not fit, rank by throughput."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from megads.pipeline.schedules import get_schedule
from megads.plan.config import PlanConfig
from megads.plan.estimate import Candidate, Estimate, balance_stage_layers, estimate, layout_plan


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(pc: PlanConfig) -> Iterator[Candidate]:
    """Every (pp, ep, cp, schedule, micro-batch size, recompute) of `pc.search` (unchecked)."""
    s, world, cfg = pc.search, pc.cluster.world_size, pc.model
    pps = s.pp or [d for d in _divisors(world) if d <= s.max_pp]
    for pp in pps:
        if pp > cfg.num_hidden_layers:
            continue
        dp = world // pp
        eps = s.ep or [e for e in _divisors(dp) if cfg.n_routed_experts % e == 0]
        schedules = ["1f1b"] if pp == 1 else s.schedules
        for ep in eps:
            for cp in s.cp:
                for sched in schedules:
                    spec = get_schedule(sched)
                    if pp < spec.min_pp or pp % spec.pp_multiple:
                        continue
                    for mbs in s.micro_batch_sizes:
                        for rec in s.recompute:
                            yield Candidate(pp=pp, ep=ep, schedule=sched, micro_batch_size=mbs, recompute=rec, cp=cp)


def evaluate(pc: PlanConfig, cand: Candidate) -> Estimate | None:
    """The estimate of `cand` (with balanced stage layers when asked), None when it is invalid."""
    try:
        if pc.search.balance_stages and cand.pp > 1 and cand.stage_layers is None:
            cand = dataclasses.replace(cand, stage_layers=balance_stage_layers(pc, cand))
        return estimate(pc, cand, plan=layout_plan(pc, cand))
    except ValueError:
        return None


def search(pc: PlanConfig) -> tuple[list[Estimate], int]:
    """(every valid estimate, best first: fitting before not fitting, then tokens/s/GPU; the number
    of candidates enumerated)."""
    out, n = [], 0
    for cand in candidates(pc):
        n += 1
        e = evaluate(pc, cand)
        if e is not None:
            out.append(e)
    out.sort(key=lambda e: (not e.memory.fits, -e.tokens_per_s_per_gpu))
    return out, n
