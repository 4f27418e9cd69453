"""What one training step moves between device and host, and between pipeline stages.

Host reads (synchronisations on a GPU) in one MoE layer's forward + backward, counted with
`megads.testing.host_reads` (tolist, item/int/bool, and the ops whose output size depends on
values: nonzero, bincount, boolean indexing, ...), against the documented minimum
(docs/performance.md, "Host synchronisation"):

- ep = 1, grouped-GEMM kernel (fp32 on CPU, bf16 on Hopper): 0; the counts and group offsets
  stay on the device;
- ep = 1, per-expert loop (the fallback, e.g. bf16 on CPU): 1, the counts read once for both
  GEMMs and their backward;
- ep = 2 (real gloo ranks): 1, the all-to-all split sizes, read once for dispatch, combine and
  both backward exchanges (also with the loop, and with the multi-node diagnostics on).

Pipeline point-to-point precision: under bf16 autocast, activations and their gradients cross
stages in bf16. Two real gloo ranks (pp 2, 1F1B, MTP on), one optimizer step, against one process
running the same micro-batches under the same autocast:

- fp32 (no autocast): the point-to-point tensors are float32 and the run is exact (1e-5);
- bf16: they are bf16, exactly half the bytes (`StepResult.sent_bytes`). The only numerical
  difference from the single process is the residual stream rounded to bf16 once at the stage
  boundary (it continues in float32 on the next stage) and its gradient rounded once on the way
  back. A single process that rounds there too (`h.to(bf16).to(fp32)` after the last layer of
  stage 0: the same rounding both ways) is the reference, within 1e-5 as in fp32; against the
  plain single process the difference is real (> 10x that) but smaller than what bf16 autocast
  itself changes against float32 (on this tiny model a rounded residual flips some routing
  choices, which is what moves the gradients by about 40% of autocast's own effect).

The two-rank checks share one spawn of two gloo ranks (start-up dominates on a small machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from megads.model.linear import LinearFactory
from megads.model.moe import MoE
from megads.parallel.executor import OptimSettings
from megads.testing.host_reads import count_host_reads
from megads.testing.parallel import reference_model_and_optimizer, spawn, tiny_config

SEED = 5
OPTIM = OptimSettings(lr=1e-3)
MTP = 0.3


def _batch(cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tok = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(7))
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def _moe_reads(moe: MoE, x_BTD: torch.Tensor, *, bf16: bool) -> list[str]:
    """Where the host reads of one forward + backward of `moe` on x happened."""
    x_BTD = x_BTD.clone().requires_grad_(True)
    with count_host_reads() as reads:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out_BTD, balance = moe(x_BTD)
        (out_BTD.float().square().mean() + balance).backward()
    assert x_BTD.grad is not None and moe.experts.gate_up_proj.weight.grad is not None
    return reads.where


def test_local_moe_reads_nothing_with_the_kernel_and_once_with_the_loop() -> None:
    cfg = tiny_config()
    torch.manual_seed(0)
    moe = MoE(cfg, factory=LinearFactory()).train()
    x_BTD = torch.randn(2, 12, cfg.hidden_size)
    assert _moe_reads(moe, x_BTD, bf16=False) == []  # fp32 on CPU: torch._grouped_mm
    where = _moe_reads(moe, x_BTD, bf16=True)  # bf16 on CPU: the per-expert loop
    assert len(where) == 1 and "linear.py" in where[0], where


def test_the_counter_sees_the_reads_it_claims_to() -> None:
    """A counter that cannot count proves nothing: every kind of read it lists, counted once."""
    t = torch.tensor([1, 2, 3])
    with count_host_reads() as reads:
        t[0].item()
        bool(t[0])
        int(t[1])
        t.tolist()
        t.nonzero()
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        _ = t[t > 1]
        torch.repeat_interleave(t, t, output_size=6)  # told its size: no read
        t.cumsum(0)
    assert reads.total == 8, reads.where


def _ep_reads(rank: int, world: int) -> dict[str, list[str]]:
    from megads.parallel.expert_parallel import shard_experts

    cfg = tiny_config()
    x_BTD = torch.randn(2, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(10 + rank))
    out: dict[str, list[str]] = {}
    for ranks_per_node in (None, 1):  # 1: two nodes, the nodes-reached diagnostics are measured too
        torch.manual_seed(0)
        moe = MoE(cfg, factory=LinearFactory()).train()
        shard_experts(moe, group=None, ep_size=world, ep_rank=rank, ranks_per_node=ranks_per_node)
        for bf16 in (False, True):
            out[f"rpn{ranks_per_node}_bf16{bf16}"] = _moe_reads(moe, x_BTD, bf16=bf16)
        if ranks_per_node == 1:
            assert moe.dispatcher.max_nodes_per_token >= 1  # type: ignore[attr-defined]
    return out


def _pp_steps(rank: int, world: int) -> dict[str, Any]:
    from megads.parallel.executor import ParallelExecutor
    from megads.parallel.mesh import ParallelMesh, plan_layout
    from megads.testing.schedule_check import _reduced_grads

    cfg = tiny_config()
    ids, labels = _batch(cfg)
    out: dict[str, Any] = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        plan = plan_layout(world_size=world, pp=2, ep=1, num_layers=cfg.num_hidden_layers,
                           n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group)
        ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, schedule="1f1b", micro_batch_size=1,
                              seed=SEED, optim=OPTIM, autocast_dtype=amp)
        grads: list[dict[str, torch.Tensor]] = []
        step = ex.optimizer.step

        def capture(*a: Any, _ex: Any = ex, _step: Any = step, _grads: list[Any] = grads, **k: Any) -> Any:
            _grads.append(_reduced_grads(_ex))
            return _step(*a, **k)

        ex.optimizer.step = capture  # type: ignore[method-assign]
        m = ex.step(ids, labels, mtp_weight=MTP)
        out[name] = {"loss": m.loss, "grads": grads[0], "sent_bytes": ex.last_step_result.sent_bytes,
                     "stage_layers": plan.stage_layers}
    return out


def _cp_steps(rank: int, world: int) -> dict[str, Any]:
    """One step of pp1 x ep1 x cp2 (MTP on), fp32 and bf16: where it read the host, latent bytes sent."""
    from megads.parallel.executor import ParallelExecutor
    from megads.parallel.mesh import ParallelMesh, plan_layout

    cfg = tiny_config()
    ids, labels = _batch(cfg)
    out: dict[str, Any] = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        plan = plan_layout(world_size=world, pp=1, ep=1, cp=world, num_layers=cfg.num_hidden_layers,
                           n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group)
        ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, micro_batch_size=1, seed=SEED,
                              optim=OPTIM, autocast_dtype=amp)
        with count_host_reads() as reads:
            m = ex.step(ids, labels, mtp_weight=MTP)
        out[name] = {"where": reads.where, "cp_bytes": int(m.extras["cp_bytes"])}
    return out


def _two_rank_worker(rank: int, world: int, outdir: str) -> None:
    torch.save({"ep_reads": _ep_reads(rank, world), "pp": _pp_steps(rank, world), "cp": _cp_steps(rank, world)},
               Path(outdir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    outdir = tmp_path_factory.mktemp("two_ranks")
    spawn(2, _two_rank_worker, str(outdir))
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_expert_parallel_moe_reads_the_split_sizes_once(two_ranks: list[dict[str, Any]]) -> None:
    for rank, res in enumerate(two_ranks):
        assert len(res["ep_reads"]) == 4
        for case, where in res["ep_reads"].items():
            assert len(where) == 1 and "expert_parallel.py" in where[0], (rank, case, where)


def test_context_parallel_reads_nothing_in_the_model_and_sends_the_latent_in_bf16(
        two_ranks: list[dict[str, Any]]) -> None:
    """Under cp the balance loss's sequence length and the MTP depths' rows stay on the device (no
    read in router.py or the stage), and under bf16 autocast the latent crosses in bf16: half the
    bytes of fp32 (the rotated rope key comes out of float32 tables and is cast before the gather)."""
    for rank, res in enumerate(two_ranks):
        for name in ("fp32", "bf16"):
            model_reads = [w for w in res["cp"][name]["where"] if "router.py" in w or "stages.py" in w
                           or "attention.py" in w or "context_parallel.py" in w]
            assert model_reads == [], (rank, name, model_reads)
        assert res["cp"]["fp32"]["cp_bytes"] > 0
        assert 2 * res["cp"]["bf16"]["cp_bytes"] == res["cp"]["fp32"]["cp_bytes"], (rank, res["cp"])


def _reference(cfg: Any, amp: torch.dtype | None, *, round_after: int | None = None) -> dict[str, Any]:
    """One process; `round_after`: round the residual stream (and its gradient) to bf16 after that layer."""
    model, _ = reference_model_and_optimizer(cfg, optim=OPTIM, seed=SEED)
    if round_after is not None:
        def round_bf16(mod: Any, args: Any, out: tuple[torch.Tensor, torch.Tensor]) -> Any:
            return out[0].to(torch.bfloat16).to(out[0].dtype), out[1]

        model.layers[str(round_after)].register_forward_hook(round_bf16)
    ids, labels = _batch(cfg)
    total = 0.0
    for i in range(ids.shape[0]):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            loss = model.compute_loss(ids[i : i + 1], labels[i : i + 1], mtp_weight=MTP).total
        (loss / ids.shape[0]).backward()
        total += float(loss.detach()) / ids.shape[0]
    return {"loss": total, "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}}


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    """Relative difference of the whole gradient (all `names` concatenated)."""
    x = torch.cat([a[n].double().reshape(-1) for n in names])
    y = torch.cat([b[n].double().reshape(-1) for n in names])
    return float((x - y).norm() / y.norm())


def test_pipeline_sends_bf16_under_bf16_autocast(two_ranks: list[dict[str, Any]]) -> None:
    cfg = tiny_config()
    ranks = [r["pp"] for r in two_ranks]
    first_stage_layers = ranks[0]["fp32"]["stage_layers"][0]
    ref = {"fp32": _reference(cfg, None), "bf16": _reference(cfg, torch.bfloat16),
           "bf16_rounded": _reference(cfg, torch.bfloat16, round_after=first_stage_layers - 1)}
    # bytes: one [1, T, D] activation forward and its gradient back per micro-batch, 2 micro-batches
    B, T, D = 1, _batch(cfg)[0].shape[1], cfg.hidden_size
    for r in ranks:
        assert r["fp32"]["sent_bytes"] == 2 * B * T * D * 4, r["fp32"]["sent_bytes"]
        assert r["bf16"]["sent_bytes"] == 2 * B * T * D * 2, r["bf16"]["sent_bytes"]
    grads: dict[str, dict[str, torch.Tensor]] = {"fp32": {}, "bf16": {}}
    for r in ranks:
        for name in grads:
            grads[name].update(r[name]["grads"])
    names = sorted(ref["fp32"]["grads"])
    assert set(names) <= set(grads["fp32"]), set(names) - set(grads["fp32"])
    loss = {name: next(float(r[name]["loss"]) for r in ranks if r[name]["loss"] is not None) for name in grads}
    # fp32: exact
    assert abs(loss["fp32"] - ref["fp32"]["loss"]) <= 1e-5 * abs(ref["fp32"]["loss"])
    assert _rel(grads["fp32"], ref["fp32"]["grads"], names) <= 1e-5
    # bf16: exact against the single process that rounds at the same boundary
    assert abs(loss["bf16"] - ref["bf16_rounded"]["loss"]) <= 1e-5 * abs(ref["bf16_rounded"]["loss"])
    rounded = _rel(grads["bf16"], ref["bf16_rounded"]["grads"], names)
    assert rounded <= 1e-5, rounded
    # ... and that rounding is what differs from the plain single process, less than autocast does
    boundary = _rel(grads["bf16"], ref["bf16"]["grads"], names)
    amp_effect = _rel(ref["bf16"]["grads"], ref["fp32"]["grads"], names)
    assert 10 * max(rounded, 1e-7) < boundary < amp_effect, (rounded, boundary, amp_effect)
