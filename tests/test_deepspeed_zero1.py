"""megads' ZeRO-1 against DeepSpeed's ZeRO stage 1 with expert-data-parallel groups, on 4 gloo ranks.

DeepSpeed is the independent reference. The same tiny DeepSeek-V3 (ep = 2, so the two ep ranks
hold different routed experts) is trained on the same batches twice in each rank:

    megads     ParallelExecutor, pp 1, dp 4, ep 2 -> edp 2: Zero1AdamW shards the dense state
               over dp and the expert state over edp; gradients of loss/(M*dp) are reduce-scattered
               with SUM
    DeepSpeed  deepspeed.initialize with zero_optimization.stage = 1 around a client
               torch.optim.AdamW whose param groups come from
               split_params_into_different_moe_groups_for_optimizer; DeepSpeed's own `ep_size_2`
               groups carry the experts' all-to-all and the expert gradient reduction (grads / dp,
               reduce-scattered over edp); its engine runs the accumulation boundary (one
               engine.backward/step per micro-batch, gradient_accumulation_steps = M)

Both use the same AdamW hyper-parameters, two param groups (decay / no decay), clipping to a
global norm that really clips, MTP and the auxiliary-loss-free bias update. The global gradient
norm of every step must agree. After the last step every parameter and both Adam moments of every
parameter must agree. megads' moments come from its flat shards, all-gathered over their group
and cut at the bucket offsets. DeepSpeed's come from `safe_get_full_optimizer_state`.

Tolerances (fp32): parameters within 1e-6 absolute (they are O(0.01-1); measured 6e-8, one ulp).
Moments and norms within 5e-6 of the tensor's largest value (measured 1.2e-6 for exp_avg, 2.1e-6
for exp_avg_sq, 8.5e-7 for the norm). This floor comes from fp32 gradient rounding plus megads'
norm, which is a float32 `vector_norm` over whole flat shards, 6.6e-7 off torch's per-parameter
norm here. Wrong betas, lr, weight decay, clipping or expert reduction move these numbers by
1e-4 or more.

No DeepSpeed C++ op is built. The client optimizer is torch's. The shared-memory all-reduce op
that DeepSpeed's CPU backend JIT-compiles at start-up is switched off (it serves only
`inference_all_reduce`, never ZeRO training). TORCH_EXTENSIONS_DIR points at an empty folder
that must stay empty. About 25 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megads.model.balance import update_expert_bias
from megads.model.moe import RoutedExperts
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.expert_parallel import shard_experts
from megads.parallel.mesh import LayoutPlan, ParallelMesh, plan_layout
from megads.parallel.stages import build_stage_model, piece_specs
from megads.parallel.zero1 import Zero1AdamW
from megads.testing.parallel import make_batches, spawn, tiny_config

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is this test's reference: pip install -e '.[dev]'"
)

WORLD, EP = 4, 2
STEPS = 4
GLOBAL_BATCH, SEQ, MICRO = 8, 16, 1  # M = 8 / (dp 4 * 1) = 2 micro-batches per dp rank
MTP_WEIGHT = 0.3
SEED = 7
OPTIM = OptimSettings(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, max_grad_norm=0.5,
                      bias_update_speed=1e-3)
PARAM_ATOL = 1e-6
STATE_RTOL = 5e-6  # of the tensor's max |value| (moments) / of the norm


def _param_groups(named: dict[str, nn.Parameter], *, weight_decay: float) -> list[dict[str, Any]]:
    """Decay for matrices, none for vectors (norm weights); `name` is what DeepSpeed's MoE split keys on."""
    return [
        {"name": "decay", "params": [p for p in named.values() if p.ndim >= 2], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0},
    ]


def _megads_state(opt: Zero1AdamW) -> dict[int, dict[str, torch.Tensor]]:
    """id(param) -> its whole fp32 master, exp_avg and exp_avg_sq, rebuilt from the spaces' shards.

    Reads the flat buffers and bucket offsets, not `state_dict` (whose format may change): each
    bucket's shard is all-gathered over the space's group, then cut at the params' offsets.
    Collective: every rank of a group visits the same spaces and buckets in the same order.
    """
    out: dict[int, dict[str, torch.Tensor]] = {}
    for sp in opt.spaces:
        for b in sp.buckets:
            n = sp.part(b.padded)
            full: dict[str, torch.Tensor] = {}
            for key in ("master", "exp_avg", "exp_avg_sq"):
                shard = getattr(sp, key)[b.shard_offset : b.shard_offset + n].float().contiguous()
                if sp.shard and sp.group_size > 1:
                    flat_P = torch.empty(b.padded, dtype=torch.float32)
                    dist.all_gather_into_tensor(flat_P, shard, group=sp.group)
                else:
                    flat_P = shard
                full[key] = flat_P
            for p, o in zip(b.params, b.offsets):
                out[id(p)] = {k: v[o : o + p.numel()].view_as(p).clone() for k, v in full.items()}
    return out


def _deepspeed_run(
    plan: LayoutPlan, mesh: ParallelMesh, batches: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[nn.Module, list[float]]:
    """The same model and batches through DeepSpeed's engine and ZeRO stage 1 (see the module docstring)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from deepspeed.utils import groups

    cfg = tiny_config()
    rank = dist.get_rank()
    os.environ["LOCAL_RANK"] = str(rank)  # what a launcher sets; the engine refuses to start without it
    # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce op when it starts (about 1.5 min
    # of g++; only `inference_all_reduce` uses it). Without it every collective is torch.distributed's.
    with mock.patch("deepspeed.comm.torch.build_shm_op", return_value=None):
        deepspeed.init_distributed(dist_backend="gloo", dist_init_required=False)
    groups._create_expert_and_data_parallel(EP)
    name = f"ep_size_{EP}"
    ep_ranks = list(groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(groups._get_expert_data_parallel_group_ranks(name))
    # DeepSpeed's E + D rank order is megads' mesh order: the same ranks hold the same experts
    assert (ep_ranks, edp_ranks) == (mesh.ep_ranks, mesh.edp_ranks), (ep_ranks, edp_ranks, mesh.describe())

    model = build_stage_model(cfg, specs=piece_specs(plan.stage_layers), seed=SEED)
    expert_names = set(shard_experts(model, group=groups._get_expert_parallel_group(name), ep_size=EP,
                                     ep_rank=ep_ranks.index(rank), ranks_per_node=plan.ranks_per_node))
    named = dict(model.named_parameters())
    for n in expert_names:  # DeepSpeed's tags for expert parameters
        named[n].allreduce = False  # type: ignore[attr-defined]
        named[n].group_name = name  # type: ignore[attr-defined]
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        _param_groups(named, weight_decay=OPTIM.weight_decay)
    )
    moe_ids = {id(p) for g in param_groups if g.get("moe") for p in g["params"]}
    assert moe_ids == {id(named[n]) for n in expert_names}, [g["name"] for g in param_groups]
    client = torch.optim.AdamW(param_groups, lr=OPTIM.lr, betas=OPTIM.betas, eps=OPTIM.eps, foreach=False)
    M = GLOBAL_BATCH // (mesh.dp * MICRO)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": M,
        "gradient_clipping": OPTIM.max_grad_norm,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    # The engine turns its MoE handling on (expert groups handed to the ZeRO optimizer, expert
    # params broadcast over edp only) just for modules of its own MoE class; ours are megads'.
    with mock.patch("deepspeed.runtime.engine.MoE", RoutedExperts):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config, dist_init_required=False)
    zero = engine.optimizer
    assert type(zero).__name__ == "DeepSpeedZeroOptimizer" and zero.has_moe_layers, type(zero)

    norms = []
    per = GLOBAL_BATCH // mesh.dp
    lo = mesh.dp_rank * per  # DeepSpeed's dp rank is the global rank here (no mpu), as megads' for pp = 1
    for ids_GT, labels_GT in batches:
        ids_BT, labels_BT = ids_GT[lo : lo + per], labels_GT[lo : lo + per]
        for i in range(0, per, MICRO):
            out = engine.module.compute_loss(ids_BT[i : i + MICRO], labels_BT[i : i + MICRO], mtp_weight=MTP_WEIGHT)
            engine.backward(out.total)  # scaled by 1/M inside; the reduction divides by dp
            engine.step()  # a no-op except at the accumulation boundary
        norms.append(float(engine.get_global_grad_norm()))
        update_expert_bias(engine.module, gamma=OPTIM.bias_update_speed, all_reduce=dist.all_reduce)
    # DeepSpeed 0.19.8 links each parameter to its optimizer-state fragment once, right after the
    # first param group's first step, when torch's AdamW has no state yet for the other groups;
    # relink now so that `safe_get_full_optimizer_state` finds every group's moments.
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()
    return engine.module, norms


def _worker(rank: int, world: int, outdir: str) -> None:
    cfg = tiny_config()
    plan = plan_layout(world_size=world, pp=1, ep=EP, num_layers=cfg.num_hidden_layers,
                       n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group)
    mesh = ParallelMesh.build(plan)
    batches = make_batches(cfg, steps=STEPS, global_batch=GLOBAL_BATCH, seq_len=SEQ, seed=11)
    t0 = time.perf_counter()

    ex = ParallelExecutor(
        cfg, mesh=mesh, plan=plan, micro_batch_size=MICRO, seed=SEED, optim=OPTIM,
        param_groups_fn=lambda m: _param_groups(dict(m.named_parameters()), weight_decay=OPTIM.weight_decay),
    )
    assert {(sp.kind, sp.group_size) for sp in ex.optimizer.spaces} == {("dense", mesh.dp), ("expert", mesh.edp)}
    megads_norms = [ex.step(ids, labels, mtp_weight=MTP_WEIGHT).grad_norm for ids, labels in batches]
    megads_state = _megads_state(ex.optimizer)
    t1 = time.perf_counter()

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ds_model, ds_norms = _deepspeed_run(plan, mesh, batches)
    ds_named = dict(ds_model.named_parameters())
    t2 = time.perf_counter()

    problems = []
    for step, (a, b) in enumerate(zip(megads_norms, ds_norms)):
        if abs(a - b) > STATE_RTOL * b:
            problems.append(f"rank {rank} step {step}: grad norm megads {a!r} vs DeepSpeed {b!r}")
    if max(ds_norms) <= OPTIM.max_grad_norm:
        problems.append(f"clipping never acted (norms {ds_norms}): lower max_grad_norm")
    # the ep ranks hold different experts (the test would be blind to a mix-up otherwise)
    w = next(p for n, p in ex.model.named_parameters() if ".experts." in n).detach()
    copies = [torch.empty_like(w) for _ in range(world)]
    dist.all_gather(copies, w)
    if torch.equal(copies[mesh.ep_ranks[0]], copies[mesh.ep_ranks[1]]):
        problems.append("ep ranks hold identical experts")

    expert_names = {n for n, _ in ex.model.named_parameters() if ".experts." in n}
    worst: dict[str, tuple[float, float, str]] = {}  # kind -> (max |diff|, that / max |DeepSpeed|, param)
    for n, p in ex.model.named_parameters():
        q = ds_named[n]
        theirs = {"param": q.detach(), "master": safe_get_full_fp32_param(q),
                  "exp_avg": safe_get_full_optimizer_state(q, "exp_avg"),
                  "exp_avg_sq": safe_get_full_optimizer_state(q, "exp_avg_sq")}
        ours = {"param": p.detach(), **megads_state[id(p)]}
        for k, t in theirs.items():
            d = float((ours[k] - t).abs().max())
            rel = d / max(float(t.abs().max()), 1e-30)
            for key in (k, f"expert {k}") if n in expert_names else (k,):
                if key not in worst or rel > worst[key][1]:
                    worst[key] = (d, rel, n)
            if (d > PARAM_ATOL) if k in ("param", "master") else (rel > STATE_RTOL):
                problems.append(f"rank {rank} {n}: {k} differs by {d:.3e} ({rel:.2e} of its max)")
    worst["norm"] = (max(abs(a - b) for a, b in zip(megads_norms, ds_norms)),
                     max(abs(a - b) / b for a, b in zip(megads_norms, ds_norms)), "global")
    result = {"problems": problems, "worst": worst, "norms": (megads_norms, ds_norms),
              "seconds": {"megads": t1 - t0, "deepspeed": t2 - t1}}
    torch.save(result, Path(outdir) / f"rank{rank}.pt")


def test_zero1_matches_deepspeed_stage1_with_expert_groups(tmp_path: Path) -> None:
    ext = tmp_path / "torch_extensions"
    ext.mkdir()
    env = {"DS_ACCELERATOR": "cpu", "DS_BUILD_OPS": "0", "TORCH_EXTENSIONS_DIR": str(ext)}
    with mock.patch.dict(os.environ, env):
        spawn(WORLD, _worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r, res in enumerate(results):
        print(f"rank {r}: worst {res['worst']}; seconds {res['seconds']}")
    problems = [p for res in results for p in res["problems"]]
    assert not problems, "\n".join(problems[:20])
    assert not any(ext.iterdir()), f"DeepSpeed compiled a C++ op: {sorted(ext.iterdir())}"
