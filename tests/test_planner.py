"""The capacity planner (megads.plan): against measurements here and two published points.

Measured references: saved-for-backward bytes (megads.testing.activations.SavedTensorTracker) of
one process and of real 2-rank gloo pipelines; the per-rank bytes tools/rank_memory measures on a
rank built alone; the layout order tools/bench_parallel measured (docs/performance.md). Published:
DeepSeek-V3's 180K H800 GPU-hours per trillion tokens, Megatron-Core's 368 TFLOP/s per H100.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from megads.pipeline.actions import Costs
from megads.pipeline.schedules import build_schedule
from megads.pipeline.validate import simulate

from megads.model.transformer import DeepseekV3
from megads.parallel.stages import piece_specs
from megads.plan.activations import embedding_elems, head_elems, layer_elems, mtp_elems
from megads.plan.cli import compose_plan, given_candidate, main
from megads.plan.emit import train_overrides
from megads.plan.estimate import (
    Candidate,
    PieceCosts,
    PieceTime,
    estimate,
    layout_plan,
    piece_work,
    rank_model_state,
)
from megads.plan.search import search
from megads.testing.activations import SavedTensorTracker
from megads.testing.parallel import spawn
from megads.train.cli import compose_config
from tools.plan_validate import DEEPSEEK_V3, MEGATRON_H100, activation_rows
from tools.rank_memory import run as rank_memory_run

# tools/bench_parallel's tiny_config as planner overrides
BENCH_TINY = ["model=tiny", "model.vocab_size=64", "model.hidden_size=32", "model.intermediate_size=64",
              "model.moe_intermediate_size=16", "model.num_attention_heads=2", "model.kv_lora_rank=16",
              "model.q_lora_rank=16", "model.qk_rope_head_dim=8", "model.qk_nope_head_dim=8", "model.v_head_dim=8"]


def test_activation_count_matches_saved_tensors_of_one_process() -> None:
    pc = compose_plan(["model=tiny", "precision=fp32", "plots=false"])
    cfg = pc.model
    torch.manual_seed(0)
    model = DeepseekV3(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    B, T = 2, 48
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    tracker = SavedTensorTracker(exclude=list(model.parameters()))
    with tracker:
        loss = model.compute_loss(ids, ids, mtp_weight=0.3)
    n = B * T
    pred = sum(layer_elems(cfg, i, seq_len=T).nbytes(tokens=n, precision="fp32") for i in range(cfg.num_hidden_layers))
    pred += embedding_elems().nbytes(tokens=n, precision="fp32")
    pred += head_elems(cfg, chunked_loss=False).nbytes(tokens=n, precision="fp32")
    pred += mtp_elems(cfg, seq_len=T - 1, recompute="none", chunked_loss=False).nbytes(tokens=B * (T - 1), precision="fp32")
    assert abs(pred / tracker.peak - 1) < 0.02, (pred, tracker.peak)
    loss.total.backward()
    del loss
    assert tracker.live == 0  # every saved tensor released with its graph


def test_pipeline_activation_peaks_of_three_schedules_within_10_percent() -> None:
    """2 gloo ranks, tiny model: each rank's measured peak under 1f1b, dualpipe, dualpipev."""
    rows = activation_rows("tiny", seq_len=32)
    assert {(r["schedule"], r["rank"]) for r in rows} == {(s, k) for s in ("1f1b", "dualpipe", "dualpipev") for k in (0, 1)}
    for r in rows:
        assert abs(r["ratio"] - 1) < 0.10, r
    # the schedules differ, and the prediction follows: 1F1B's first rank holds the most live micro-batches
    by = {(r["schedule"], r["rank"]): r["measured"] for r in rows}
    assert by[("1f1b", 1)] != by[("1f1b", 0)] and by[("dualpipe", 0)] == by[("dualpipe", 1)]


@pytest.mark.slow
def test_pipeline_activation_peaks_small_model() -> None:
    """The same on the 163M `small` preset (about 80 s)."""
    for r in activation_rows("small", seq_len=64):
        assert abs(r["ratio"] - 1) < 0.10, r


@pytest.mark.parametrize("overrides, world", [
    (["model=tiny", "parallel=pp2_ep2", "parallel.moments_dtype=bfloat16"], 8),
    (["model=tiny", "parallel=pp2_ep2", "parallel.schedule=dualpipe", "parallel.moments_dtype=bfloat16"], 4),
    (["model=tiny", "parallel=dualpipev_pp2_ep2", "parallel.moments_dtype=bfloat16"], 4),
])
def test_model_state_equals_rank_memory(overrides: list[str], world: int) -> None:
    """Parameters and ZeRO-1 state of every rank: the planner's count = the bytes of a built rank."""
    pc = compose_plan([*overrides, "plots=false", "balance_stages=false"])
    pc = dataclasses.replace(pc, cluster=dataclasses.replace(pc.cluster, nodes=1, gpus_per_node=world))
    cand = given_candidate(pc)
    plan = layout_plan(pc, cand)
    layout = build_schedule(cand.schedule, pp=cand.pp, num_microbatches=2 * cand.pp).layout
    for rank in range(world):
        res = rank_memory_run(overrides, world=world, rank=rank, ranks_per_node=None, touch=False)
        measured_params = sum(r["measured"] for r in res["rows"] if r["what"].startswith("parameters"))
        measured_zero1 = sum(r["measured"] for r in res["rows"] if r["what"].startswith("zero1"))
        rp, z = rank_model_state(pc, plan, layout, rank=rank // plan.dp)
        assert rp.total * 4 == measured_params, (rank, rp)
        assert sum(s.total for s in z) == measured_zero1, (rank, [s.total for s in z])


def _published(overrides: list[str]) -> object:
    pc = compose_plan([*overrides, "plots=false"])
    return estimate(pc, given_candidate(pc, balance=pc.balance_stages))


def test_deepseek_v3_gpu_hours_within_15_percent_of_the_report() -> None:
    est = _published(DEEPSEEK_V3)
    assert abs(est.gpu_hours / 180e3 - 1) < 0.15, est.gpu_hours  # type: ignore[attr-defined]


def test_megatron_h100_tflops_within_20_percent_with_the_same_efficiencies() -> None:
    est = _published(MEGATRON_H100)
    assert abs(est.model_tflops_per_gpu / 368 - 1) < 0.20, est.model_tflops_per_gpu  # type: ignore[attr-defined]


def test_prediction_moves_with_its_assumptions() -> None:
    """A halved FP8 GEMM efficiency or the 1F1B schedule (no F&B overlap) must cost more."""
    base = _published(DEEPSEEK_V3)
    slow = _published([*DEEPSEEK_V3, "efficiency.grouped_fp8=0.275", "efficiency.gemm_fp8=0.3"])
    plain = _published([*DEEPSEEK_V3, "parallel.schedule=1f1b"])
    assert slow.gpu_hours > 1.3 * base.gpu_hours  # type: ignore[attr-defined]
    assert plain.time.a2a_exposed_s > 2 * base.time.a2a_exposed_s  # type: ignore[attr-defined]


def test_cpu_layouts_rank_in_the_measured_order() -> None:
    """tools/bench_parallel measured pp1 x ep1 x dp8 faster than pp2 x ep2 x dp2 (ratio 0.78-0.90)."""
    common = [*BENCH_TINY, "cluster=cpu_dev_8", "precision=fp32", "seq_len=16", "global_batch=32",
              "parallel.micro_batch_size=2", "parallel.schedule=1f1b", "balance_stages=false", "plots=false"]
    steps = {}
    for pp, ep in ((2, 2), (1, 1)):
        steps[(pp, ep)] = _published([*common, f"parallel.pp={pp}", f"parallel.ep={ep}"]).time.step_s  # type: ignore[attr-defined]
    assert steps[(1, 1)] < steps[(2, 2)]


def test_piece_costs_with_equal_pieces_reproduce_uniform_costs() -> None:
    sched = build_schedule("dualpipe", pp=4, num_microbatches=8)
    t = PieceTime(F=1.0, B=1.0, W=1.0, a2a_F=0.0, a2a_B=0.0)
    pieces = PieceCosts(chunk_piece=tuple(c.piece for c in sched.layout.chunks), times=(t,) * 4)
    assert simulate(sched, costs=pieces).makespan == simulate(sched, costs=Costs(F=1, B=1, W=1)).makespan


def test_search_ranks_fitting_layouts_and_emits_a_trainer_launch(tmp_path: Path) -> None:
    overrides = ["mode=search", "model=small", "cluster=h100_1024", "cluster.nodes=2", "seq_len=1024",
                 "global_batch=64", "precision=bf16", "search.schedules=[1f1b,dualpipev]",
                 "search.recompute=[none,full]", f"out_dir={tmp_path}"]
    pc = compose_plan(overrides)
    ests, n = search(pc)
    assert n > len(ests) > 4
    fitting = [e for e in ests if e.memory.fits]
    assert fitting and ests[0].memory.fits
    tps = [e.tokens_per_s_per_gpu for e in fitting]
    assert tps == sorted(tps, reverse=True)
    best = fitting[0]
    line = train_overrides(pc, best, model_choice="small", parallel_choice="single")
    tc = compose_config(line)  # the emitted line is a valid trainer config for this cluster
    tc.parallel.validate(world_size=pc.cluster.world_size, model=tc.model)  # type: ignore[attr-defined]
    assert tc.parallel.pp == best.candidate.pp and tc.memory.recompute == best.candidate.recompute  # type: ignore[attr-defined]
    assert main(overrides) == 0
    assert (tmp_path / "plan_breakdown.png").stat().st_size > 0 and (tmp_path / "plan_search.png").stat().st_size > 0
    assert (tmp_path / "plan.json").exists()


def test_context_parallel_activations_and_latent_bytes_equal_two_real_cp_ranks(tmp_path: Path) -> None:
    """2 gloo ranks of pp1 x ep1 x cp2 (tiny, 1 x 256 tokens, fp32, MTP on; the worker of
    tools/bench_context_parallel): each rank's saved-for-backward peak within 5% of the planner's
    activations, and the latent bytes the trainer counts (`cp_bytes`) within 1% of the planner's
    (the MTP depth's gather pads rank 0's one missing row)."""
    from tools.bench_context_parallel import worker

    spawn(2, worker, "tiny", 256, 1, 1, str(tmp_path))
    measured = [torch.load(tmp_path / f"cp2.rank{r}.pt", weights_only=False) for r in range(2)]
    pc = compose_plan(["model=tiny", "cluster=cpu_dev_8", "parallel=single", "parallel.micro_batch_size=1",
                       "parallel.cp=2", "seq_len=256", "precision=fp32", "global_batch=4", "plots=false"])
    est = estimate(pc, given_candidate(pc))
    for m in measured:
        assert abs(est.memory.activations / m["peak"] - 1) < 0.05, (est.memory.activations, m["peak"])
    (work,) = [piece_work(pc.model, s, est.plan, pc, est.candidate) for s in piece_specs(est.plan.stage_layers)]
    assert abs(work.cp_bytes / measured[0]["sent"] - 1) < 0.01, (work.cp_bytes, measured[0]["sent"])
    # and it is a launch: the emitted line is a trainer config with cp = 2 on this cluster
    line = train_overrides(pc, est, model_choice="tiny", parallel_choice="single")
    tc = compose_config(line)
    tc.parallel.validate(world_size=pc.cluster.world_size, model=tc.model)  # type: ignore[attr-defined]
    assert tc.parallel.cp == 2 and any("context parallel 2" in n for n in est.notes)  # type: ignore[attr-defined]


def test_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="precision='fp4'"):
        compose_plan(["precision=fp4"])
    with pytest.raises(ValueError, match="efficiency.gemm_fp8=1.5"):
        compose_plan(["efficiency.gemm_fp8=1.5"])
    with pytest.raises(Exception, match="gemm_fp9"):
        compose_plan(["efficiency.gemm_fp9=0.5"])
    with pytest.raises(ValueError, match="global_batch=100 is not a multiple"):
        estimate(compose_plan(["global_batch=100", "plots=false"]), Candidate(pp=16, ep=64, schedule="dualpipe",
                                                                            micro_batch_size=1, recompute="none"))


def test_671b_rank_state_equals_the_measured_ranks_of_docs() -> None:
    """tools/rank_memory on ranks 0 and 1000 of the 2,048-GPU recipe (docs/performance.md, issue 11)."""
    pc = compose_plan(["plots=false", "balance_stages=false"])
    cand = given_candidate(pc)
    plan = layout_plan(pc, cand)
    layout = build_schedule("dualpipe", pp=16, num_microbatches=32).layout
    for pp_rank, params, dense, expert in ((0, 21_372_911_616, 434_867_328, 4_227_858_432),
                                           (7, 13_093_044_224, 174_747_648, 8_455_716_864)):
        rp, z = rank_model_state(pc, plan, layout, rank=pp_rank)
        assert rp.total * 4 == params
        assert (z[0].total, z[1].total, z[2].total) == (dense, expert, 0)
