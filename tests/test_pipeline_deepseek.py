"""Every pipeline schedule on the DeepSeek model against one process (gloo, float32, real ranks).

Tiny model (6 layers: dense + MoE, MTP on, balance loss on), ZeRO-1, clipping, weight decay.
Layouts: pp2 x ep2 (dp 2) and pp4 x ep1 on 4 ranks, pp4 x ep2 (dp 2) on 8 ranks; each under
1f1b, interleaved, zb1p, dualpipe, dualpipev, and dualpipe / dualpipev with the overlapped F&B
stage (`DeepseekStage(overlap=True)`). Each case runs two optimizer steps with different micro-batch
counts, the first the schedule's minimum; losses, full gradients (before ZeRO-1) and the updated
parameters match a single-process run on the same micro-batches within 1e-6 relative. All cases
of one world size share one spawned group (start-up dominates).

lr = 1e-5: Adam's first update is ~lr * sign(g), so a float-rounding difference in a gradient
element near zero moves a parameter by up to ~lr, and the second step's gradients see it; with
1e-5 the worst relative difference is ~6e-7 (1e-4 gave 1.2e-6 on 8 ranks), while a wrong
gradient still moves parameters by ~1e-5/0.02 = 5e-4 relative per step and the gradients
themselves are compared directly (the check can fail: a broken dispatch backward gives 1e-1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from megads.pipeline.schedules import min_microbatches

from megads.parallel.executor import OptimSettings
from megads.testing.parallel import spawn, tiny_config
from megads.testing.schedule_check import (
    ScheduleCase,
    compare_case,
    make_step_batches,
    overlap_order_worker,
    reference_with_grads,
    schedule_worker,
)

RTOL = 1e-6
MTP_WEIGHT = 0.3
SEED = 11
OPTIM = OptimSettings(lr=1e-5, weight_decay=0.1, max_grad_norm=1.0, bias_update_speed=1e-3, bucket_numel=3000)

# second micro-batch count of each schedule (the first is its minimum)
_MORE = {"1f1b": 2, "zb1p": 2, "interleaved": 1, "dualpipe": 2, "dualpipev": 1}


def _cases(layouts: tuple[tuple[int, int], ...]) -> list[ScheduleCase]:
    out = []
    for pp, ep in layouts:
        for sched in ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev"):
            lo = min_microbatches(sched, pp=pp)
            extra = _MORE[sched] * (pp if sched == "interleaved" else 1)
            out.append(ScheduleCase(pp, ep, sched, False, (lo, lo + extra)))
        for sched in ("dualpipe", "dualpipev"):
            lo = min_microbatches(sched, pp=pp)
            out.append(ScheduleCase(pp, ep, sched, True, (lo, lo + _MORE[sched])))
    return out


CASES = {4: _cases(((2, 2), (4, 1))), 8: _cases(((4, 2),))}


def _run(world: int, outdir: Path) -> dict[str, Any]:
    # 6 layers: pp 4 with two pieces per rank (interleaved, dualpipev) needs 6 inner layers
    cfg = tiny_config(num_hidden_layers=6)
    batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    refs: dict[tuple[int, ...], dict[str, Any]] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for case in CASES[world]:
            sizes = case.global_batches(world)
            batches[case.tag] = make_step_batches(cfg, sizes=sizes, seq_len=12)
            if sizes not in refs:
                refs[sizes] = reference_with_grads(
                    cfg, batches=batches[case.tag], mtp_weight=MTP_WEIGHT, optim=OPTIM, seed=SEED
                )
    finally:
        torch.set_num_threads(threads)
    spawn(world, schedule_worker, cfg, CASES[world], batches, MTP_WEIGHT, OPTIM, SEED, str(outdir))
    return {"outdir": outdir, "refs": refs, "world": world}


@pytest.fixture(scope="module")
def results4(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(4, tmp_path_factory.mktemp("pipeline_deepseek4"))


@pytest.fixture(scope="module")
def results8(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run(8, tmp_path_factory.mktemp("pipeline_deepseek8"))


def _check(results: dict[str, Any], case: ScheduleCase) -> None:
    world = results["world"]
    ref = results["refs"][case.global_batches(world)]
    # the reference really moves: two different losses
    assert ref["losses"][0] != ref["losses"][1]
    problems, worst = compare_case(ref, outdir=results["outdir"], tag=case.tag, world=world, rtol=RTOL)
    assert not problems, f"worst relative difference {worst:.2e}\n" + "\n".join(problems[:20])


@pytest.mark.parametrize("case", CASES[4], ids=[c.tag for c in CASES[4]])
def test_four_ranks_match_one_process(results4: dict[str, Any], case: ScheduleCase) -> None:
    _check(results4, case)


@pytest.mark.slow  # 8 ranks; the 4-rank cases above cover every schedule with pp 2 x ep 2 and pp 4
@pytest.mark.parametrize("case", CASES[8], ids=[c.tag for c in CASES[8]])
def test_pp4_ep2_on_eight_ranks_matches_one_process(results8: dict[str, Any], case: ScheduleCase) -> None:
    _check(results8, case)


def test_overlapped_pair_interleaves_and_matches(tmp_path: Path) -> None:
    """F&B on a real (one-rank) gloo ep group: same losses and gradients as DeepseekStage's
    sequential F then BW, and the all-to-alls of the two chunks are issued alternately."""
    cfg = tiny_config()
    out = tmp_path / "order.pt"
    spawn(1, overlap_order_worker, cfg, str(out))
    res = torch.load(out, weights_only=False)
    # forward values are the same operations in the same order: bit-identical
    for a, b in zip(res["y_plain"], res["y_overlap"]):
        assert torch.equal(a, b), (a, b)
    assert res["grads_plain"].keys() == res["grads_overlap"].keys()
    for name, g in res["grads_plain"].items():
        h = res["grads_overlap"][name]
        assert float((g - h).norm()) <= RTOL * float(g.norm()) + 1e-30, name
    # 3 MoE layers + the MTP block: 8 forward and 8 backward all-to-alls, strictly alternating,
    # the backward first (its combine gradient leaves while the forward computes attention)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) + cfg.num_nextn_predict_layers
    assert res["events"] == ["bwd", "fwd"] * (2 * n_moe), res["events"]
