"""Context parallel against one process: losses, gradient norms, updated parameters (gloo, fp32).

The tiny model with YaRN (factor 4 over 16 original positions, sequences of 32), MTP and the
sequence-wise balance loss on, three optimizer steps of 8 sequences in micro-batches of 2 with
gradient clipping, weight decay and the expert-bias update. Each layout splits every sequence
over cp ranks (zig-zag chunks, the MLA latent all-gathered); the single-process run of the same
global batch is the reference, within 1e-6 relative. The cp=1 run of the same ranks gives the
reduced gradients the cp runs must match (`assert_same_steps`, 1e-6 of each space's scale).

Adam's eps is 1e-6 here (1e-8 in training): Adam's first update moves every element by about
lr * sign(g), so an element whose gradient is zero up to float rounding moves by +-lr depending
on the order of a sum (layer 0's kv_a_proj has one such element for this batch: a 2.9e-6
relative parameter difference after one step at eps = 1e-8, with losses equal to 4e-8). With
eps = 1e-6 the update is continuous in gradients below 1e-6 and rounding stays rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megads.model.config import RopeScalingConfig
from megads.parallel.context_parallel import kv_values_per_token, latent_values_per_token, zigzag_positions
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.testing.parallel import (
    LayoutSpec,
    compare_with_reference,
    equivalence_worker,
    make_batches,
    reference_run,
    spawn,
    tiny_config,
)

RTOL = 1e-6
MBS = 2
MTP_WEIGHT = 0.3
SEED = 8
SEQ = 32
OPTIM = OptimSettings(lr=1e-4, eps=1e-6, weight_decay=0.1, max_grad_norm=0.2, bias_update_speed=1e-3, bucket_numel=3000)


def yarn_config() -> Any:
    rs = RopeScalingConfig(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                           beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    return tiny_config(max_position_embeddings=64, rope_scaling=rs)


def _setup(global_batch: int) -> dict[str, Any]:
    cfg = yarn_config()
    batches = make_batches(cfg, steps=3, global_batch=global_batch, seq_len=SEQ)
    ref = reference_run(cfg, batches=batches, micro_batch_size=MBS, mtp_weight=MTP_WEIGHT, optim=OPTIM, seed=SEED)
    assert len({round(loss, 6) for loss, _ in ref["losses"]}) == 3
    assert any(norm > OPTIM.max_grad_norm for _, norm in ref["losses"])
    return {"cfg": cfg, "batches": batches, "ref": ref}


@pytest.fixture(scope="module")
def setup() -> dict[str, Any]:
    return _setup(8)


def _check(setup: dict[str, Any], world: int, layouts: list[LayoutSpec], tmp_path: Path) -> None:
    spawn(world, equivalence_worker, setup["cfg"], layouts, setup["batches"], MBS, MTP_WEIGHT, OPTIM, SEED,
          str(tmp_path))
    problems: list[str] = []
    for spec in layouts:
        problems += compare_with_reference(setup["ref"], outdir=tmp_path, tag=spec.tag, world=world, rtol=RTOL)
    assert not problems, "\n".join(problems[:20])


def test_zigzag_split_covers_the_sequence_once_and_balances_causal_work() -> None:
    for cp in (1, 2, 4):
        parts = [zigzag_positions(32, cp=cp, rank=r) for r in range(cp)]
        assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(32))
        work = {int((p + 1).sum()) for p in parts}  # keys each rank's queries attend under the causal mask
        assert len(work) == 1, (cp, work)
    with pytest.raises(ValueError, match="multiple of 8"):
        zigzag_positions(36, cp=4, rank=0)


def test_layout_checks_cp_before_any_group() -> None:
    plan = plan_layout(world_size=8, pp=2, ep=2, cp=2, num_layers=4, n_routed_experts=8)
    assert (plan.dp, plan.cp, plan.data_parallel) == (4, 2, 2)
    with pytest.raises(ValueError, match=r"parallel.cp=3 does not divide"):
        plan_layout(world_size=8, pp=2, ep=1, cp=3, num_layers=4, n_routed_experts=8)
    mesh = ParallelMesh.local(plan, rank=3)
    assert (mesh.cp_rank, mesh.data_rank, mesh.ep_rank, mesh.cp_ranks) == (1, 1, 1, [2, 3])


def test_latent_is_71x_smaller_than_keys_and_values_for_v3() -> None:
    from megads.model.config import ModelConfig

    cfg = ModelConfig()  # the 671B defaults
    assert latent_values_per_token(cfg) == 576
    assert kv_values_per_token(cfg) == 40_960
    assert round(kv_values_per_token(cfg) / latent_values_per_token(cfg)) == 71


def test_cp_alone_and_with_ep_and_pp_on_four_ranks(setup: dict[str, Any], tmp_path: Path) -> None:
    from megads.testing.parallel import assert_same_steps

    layouts = [LayoutSpec(1, 1, cp=4), LayoutSpec(1, 2, cp=2), LayoutSpec(2, 1, cp=2, schedule="zb1p")]
    spawn(4, _four_rank_worker, setup["cfg"], layouts, setup["batches"], str(tmp_path))
    problems: list[str] = []
    for spec in layouts:
        problems += compare_with_reference(setup["ref"], outdir=tmp_path, tag=spec.tag, world=4, rtol=RTOL)
    assert not problems, "\n".join(problems[:20])
    # the reduced gradients of ep2 x cp2 equal those of ep2 without cp on the same ranks
    for r in range(4):
        want = torch.load(tmp_path / f"grads_{LayoutSpec(1, 2).tag}.rank{r}.pt", weights_only=False)
        got = torch.load(tmp_path / f"grads_{LayoutSpec(1, 2, cp=2).tag}.rank{r}.pt", weights_only=False)
        assert_same_steps(want, got, rel=RTOL)
    # bf16 autocast: the same steps within bf16 rounding (the cp path casts q, k, v itself)
    bf16 = torch.load(tmp_path / "bf16.rank0.pt", weights_only=False)
    assert all(abs(a - b) <= 1e-3 * abs(b) for a, b in zip(bf16[2], bf16[1])), bf16
    # the exchange volume: per micro-batch, every attention layer (4 main + 1 MTP) all-gathers this
    # rank's 2 x 32/cp latent rows of 16 + 8 values to cp-1 peers and sends their gradients back
    cfg = setup["cfg"]
    X = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    for spec in layouts:
        M = 8 // (MBS * (4 // (spec.pp * spec.cp)))  # micro-batches of a replica
        layers = {1: 5, 2: None}[spec.pp]
        for r in range(4):
            res = torch.load(tmp_path / f"{spec.tag}.rank{r}.pt", weights_only=False)
            if spec.pp == 2:  # piece 0: embedding + layers 0-1; piece 1: layers 2-3 + MTP
                layers = 2 if r < 2 else 3
            want = M * layers * 2 * (spec.cp - 1) * MBS * (SEQ // spec.cp) * X * 4
            assert all(extras["cp_bytes"] == want for *_, extras in res["metrics"]), (spec.tag, r, want)


@pytest.mark.slow  # covered by the four-rank test (cp with ep, cp with pp and the B/W split)
def test_cp_with_pp2_and_ep2_on_eight_ranks(tmp_path: Path) -> None:
    layouts = [LayoutSpec(2, 2, cp=2, schedule="dualpipev", overlap_fb=True), LayoutSpec(2, 1, cp=4),
               LayoutSpec(1, 2, cp=4)]
    _check(_setup(16), 8, layouts, tmp_path)


def _grads_worker(rank: int, world: int, cfg: Any, batches: Any, outdir: str) -> None:
    from megads.testing.parallel import losses_and_reduced_grads, plan_spec

    for spec in (LayoutSpec(1, 2), LayoutSpec(1, 2, cp=2)):
        plan = plan_spec(cfg, spec, world=world)
        ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, micro_batch_size=MBS, seed=SEED,
                              optim=OPTIM)
        got = losses_and_reduced_grads(ex, batches, mtp_weight=MTP_WEIGHT)
        torch.save(got, Path(outdir) / f"grads_{spec.tag}.rank{rank}.pt")


def _four_rank_worker(rank: int, world: int, cfg: Any, layouts: Any, batches: Any, outdir: str) -> None:
    """The equivalence layouts, then the gradient comparison, in one spawned group (start-up
    dominates on two cores)."""
    from megads.testing.parallel import plan_spec

    equivalence_worker(rank, world, cfg, layouts, batches, MBS, MTP_WEIGHT, OPTIM, SEED, outdir)
    _grads_worker(rank, world, cfg, batches[:2], outdir)
    bf16 = {}
    for spec in (LayoutSpec(1, 2), LayoutSpec(1, 2, cp=2)):  # under bf16 autocast
        plan = plan_spec(cfg, spec, world=world)
        ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, micro_batch_size=MBS, seed=SEED,
                              optim=OPTIM, autocast_dtype=torch.bfloat16)
        bf16[spec.cp] = [ex.step(i, t, mtp_weight=MTP_WEIGHT).loss for i, t in batches[:2]]
    torch.save(bf16, Path(outdir) / f"bf16.rank{rank}.pt")


CP_STAGES_YAML = """
list:
  - name: short
    overrides: []
  - name: long_cp2
    carry_optimizer: true
    overrides:
      - seq_len=64
      - parallel.cp=2
      - model.rope_scaling={type:yarn,factor:2.0,original_max_position_embeddings:32,beta_fast:32.0,beta_slow:1.0,mscale:1.0,mscale_all_dim:1.0}
      - schedule.warmup_steps=0
      - schedule.train_steps=2
start: null
stop: null
"""


def test_staged_run_with_cp2_in_its_last_stage(tmp_path: Path) -> None:
    """Two ranks through the CLI: stage 1 data parallel at 32 tokens, stage 2 at 64 tokens with
    YaRN split over cp = 2 (megads-train starts the ranks). The cp stage's losses equal those of
    the same stage run alone without cp (dp = 2) from the same checkpoint."""
    import json
    import os
    import subprocess
    import sys

    conf = tmp_path / "conf"
    (conf / "stages").mkdir(parents=True)
    (conf / "stages" / "cp.yaml").write_text(CP_STAGES_YAML)
    (conf / "stages" / "nocp.yaml").write_text(CP_STAGES_YAML.replace("parallel.cp=2", "parallel.cp=1"))
    common = [sys.executable, "-m", "megads.train.cli", "--config-dir", str(conf), "model=tiny", "parallel=dp",
              "parallel.micro_batch_size=1", "seq_len=32", "schedule=tiny", "schedule.train_tokens=0",
              "schedule.train_steps=2", "schedule.warmup_steps=1", "schedule.batch_start=4", "schedule.batch_end=4",
              "logging.wandb.mode=disabled", "logging.console_every=1", "data=fallback", "data.max_bytes=200000",
              "logging.expert_load_png=false", "logging.expert_heatmap_png=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([*common, "stages=cp", f"run_dir={tmp_path / 'run'}"], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "needs 2 ranks" in run.stdout + run.stderr
    assert "cp 2" in run.stdout + run.stderr  # the stage's layout line

    def losses(stage_dir: Path) -> list[float]:
        return [json.loads(line)["loss/lm"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]

    got = losses(tmp_path / "run" / "stages" / "long_cp2")
    assert len(got) == 2 and all(0 < x < 20 for x in got)
    init = tmp_path / "run" / "stages" / "short" / "checkpoints" / "step_00000002"
    alone = subprocess.run([*common, "stages=nocp", f"run_dir={tmp_path / 'alone'}", "stages.start=long_cp2",
                            f"checkpoint.init_from={init}"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stdout[-3000:] + alone.stderr[-3000:]
    want = losses(tmp_path / "alone" / "stages" / "long_cp2")
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(got, want)), (got, want)
