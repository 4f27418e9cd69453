"""Every pipeline schedule on the DeepSeek model against one process (gloo, float32, real ranks).

Tiny model with dense + MoE layers, MTP on, balance loss on, ZeRO-1, clipping. On 4 ranks:
pp2 x ep2 (dp 2) and pp4 x ep1, each under 1f1b, interleaved, zb1p, dualpipe, dualpipev, and
dualpipe / dualpipev with the overlapped F&B stage (`DeepseekOverlapStage`). Each case runs two
optimizer steps with different micro-batch counts, the first the schedule's minimum; losses,
full gradients (before ZeRO-1) and the updated parameters match a single-process run on the same
micro-batches within 1e-6 relative. All cases share one spawned group (start-up dominates).

lr = 1e-4: Adam's first update is ~lr * sign(g), so a float-rounding difference in a gradient
element near zero moves a parameter by up to ~lr; 1e-4 keeps that under the 1e-6 bound while a
wrong gradient still changes parameters by ~1e-4/0.02 = 5e-3 relative (the check can fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megads.parallel.executor import OptimSettings
from megads.parallel.harness import spawn, tiny_config
from megads.parallel.schedule_check import (
    ScheduleCase,
    compare_case,
    make_step_batches,
    reference_with_grads,
    schedule_worker,
)
from pipeline.schedules import min_microbatches

RTOL = 1e-6
MTP_WEIGHT = 0.3
SEED = 11
WORLD = 4
OPTIM = OptimSettings(lr=1e-4, weight_decay=0.1, max_grad_norm=1.0, bias_update_speed=1e-3, bucket_numel=3000)

# second micro-batch count of each schedule (the first is its minimum)
_MORE = {"1f1b": 3, "zb1p": 3, "interleaved": 2, "dualpipe": 2, "dualpipev": 1}


def _cases() -> list[ScheduleCase]:
    out = []
    for pp, ep in ((2, 2), (4, 1)):
        for sched in ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"):
            lo = min_microbatches(sched, pp=pp)
            extra = _MORE[sched] * (pp if sched == "interleaved" else 1)
            out.append(ScheduleCase(pp, ep, sched, False, (lo, lo + extra)))
        for sched in ("dualpipe", "dualpipev"):
            lo = min_microbatches(sched, pp=pp)
            out.append(ScheduleCase(pp, ep, sched, True, (lo, lo + _MORE[sched])))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # 6 layers: pp 4 with two pieces per rank (interleaved, dualpipev) needs 6 inner layers
    cfg = tiny_config(num_hidden_layers=6)
    outdir = tmp_path_factory.mktemp("pipeline_deepseek")
    batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    refs: dict[tuple[int, ...], dict[str, Any]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES:
            sizes = case.global_batches(WORLD)
            batches[case.tag] = make_step_batches(cfg, sizes=sizes, seq_len=12)
            if sizes not in refs:
                refs[sizes] = reference_with_grads(
                    cfg, batches=batches[case.tag], mtp_weight=MTP_WEIGHT, optim=OPTIM, seed=SEED
                )
    finally:
        torch.set_num_threads(threads)
    spawn(WORLD, schedule_worker, cfg, CASES, batches, MTP_WEIGHT, OPTIM, SEED, str(outdir))
    return {"outdir": outdir, "refs": refs}


@pytest.mark.parametrize("case", CASES, ids=[c.tag for c in CASES])
def test_schedule_matches_one_process(results: dict[str, Any], case: ScheduleCase) -> None:
    ref = results["refs"][case.global_batches(WORLD)]
    # the reference really moves: two different losses, parameters change
    assert ref["losses"][0] != ref["losses"][1]
    problems, worst = compare_case(ref, outdir=results["outdir"], tag=case.tag, world=WORLD, rtol=RTOL)
    assert not problems, f"worst relative difference {worst:.2e}\n" + "\n".join(problems[:20])
