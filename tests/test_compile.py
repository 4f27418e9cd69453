"""`compile: true` (megads.parallel.compile) against eager, float32, within 1e-5 relative.

One process: the tiny model (a dense and a MoE layer, MTP on) with its blocks compiled gives the
loss and every parameter gradient of the same model run eagerly, with the one-call backward and
with the B/W split (B under `deferring`, W from the stash), and composed with recomputation.
The default tests trace through Dynamo and AOTAutograd with the `aot_eager` backend (what decides
graph breaks, the traced backward and the B/W stash; seconds), the `slow` ones generate code with
inductor (C++ on this CPU; minutes of compilation on 2 cores) and run it on 4 gloo ranks,
pp 2 x ep 2, under zb1p (B/W split) and DualPipeV with the overlapped F&B, against one eager
process.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
import torch
from megads.pipeline.schedules import min_microbatches

from megads.model.config import ModelConfig
from megads.model.linear import WeightGradStash, deferrable_layers, deferring
from megads.model.recompute import apply_recompute
from megads.model.transformer import DeepseekV3
from megads.parallel.compile import apply_compile
from megads.parallel.executor import OptimSettings
from megads.testing.parallel import one_thread, spawn, tiny_config
from megads.testing.schedule_check import (
    ScheduleCase,
    compare_case,
    make_step_batches,
    reference_with_grads,
    schedule_worker,
)

RTOL = 1e-5
MTP_WEIGHT = 0.3


def _cfg() -> ModelConfig:
    return tiny_config(num_hidden_layers=2)  # layer 0 dense, layer 1 MoE, the MTP block MoE


def _model(cfg: ModelConfig) -> DeepseekV3:
    torch.manual_seed(7)
    model = DeepseekV3(cfg)
    model.train()
    return model


def _loss_and_grads(model: DeepseekV3, ids_BT: torch.Tensor, labels_BT: torch.Tensor, *, split: bool
                    ) -> tuple[float, dict[str, torch.Tensor], int]:
    """Loss, every parameter's gradient, and the number of deferred weight gradients (split: the
    B of a B/W split takes the non-GEMM parameters' gradients, W the GEMM weights' from the stash)."""
    out = model.compute_loss(ids_BT, labels_BT, mtp_weight=MTP_WEIGHT)
    names = {id(p): n for n, p in model.named_parameters()}
    params = list(model.parameters())
    if not split:
        got = torch.autograd.grad([out.total], params, allow_unused=True)
        return float(out.total.detach()), {names[id(p)]: g for p, g in zip(params, got) if g is not None}, 0
    layers = deferrable_layers(model)
    gemm = {id(m.weight) for m in layers}
    others = [p for p in params if id(p) not in gemm]
    stash = WeightGradStash()
    with deferring(layers, stash):
        got = torch.autograd.grad([out.total], others, allow_unused=True)
    deferred = len(stash)
    grads = {names[id(p)]: g for p, g in zip(others, got) if g is not None}
    grads.update({names[k]: g for k, g in stash.compute().items()})
    return float(out.total.detach()), grads, deferred


def _assert_close(ref: tuple[float, dict[str, torch.Tensor], int], got: tuple[float, dict[str, torch.Tensor], int]
                  ) -> None:
    (l0, g0, _), (l1, g1, _) = ref, got
    assert abs(l1 - l0) <= RTOL * abs(l0), (l0, l1)
    assert g0.keys() == g1.keys(), sorted(set(g0) ^ set(g1))
    for name, a in g0.items():
        b = g1[name]
        err = float((b.double() - a.double()).norm() / (a.double().norm() + 1e-30))
        assert err <= RTOL, f"{name}: relative difference {err:.2e}"


def _check_against_eager(backend: str, *, recompute: str = "none") -> None:
    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, cfg.vocab_size, (2, 13), generator=g)
    ids, labels = tok[:, :-1], tok[:, 1:]
    with one_thread():
        eager = _model(cfg)
        apply_recompute(eager, recompute)
        compiled = _model(cfg)
        # dense block: 2 norms, MLA, MLP; MoE block (layer 1, MTP): 2 norms, MLA, router, shared, combine
        assert apply_compile(compiled, backend=backend) == 4 + 6 + 6
        assert hasattr(compiled.layers["1"].self_attn.forward, "_torchdynamo_orig_callable")
        apply_recompute(compiled, recompute)
        ref = _loss_and_grads(eager, ids, labels, split=False)
        for split in (False, True):
            got = _loss_and_grads(compiled, ids, labels, split=split)
            _assert_close(ref, got)
            if split:  # every GEMM layer use handed its weight gradient to the stash
                assert got[2] == _loss_and_grads(eager, ids, labels, split=True)[2] > 0


def _block_grads(block: torch.nn.Module, x_BTD: torch.Tensor, rope: Any, *, split: bool
                 ) -> tuple[float, dict[str, torch.Tensor], int]:
    """One block's output (its sum with the balance loss as the loss), input and parameter gradients."""
    x_BTD = x_BTD.detach().requires_grad_(True)
    y_BTD, balance = block(x_BTD, rope)
    loss = (y_BTD * torch.linspace(-1, 1, y_BTD.numel()).view_as(y_BTD)).sum() + balance
    names = {id(p): n for n, p in block.named_parameters()}
    layers = deferrable_layers(block)
    gemm = {id(m.weight) for m in layers}
    asked = [p for p in block.parameters() if not split or id(p) not in gemm]
    stash = WeightGradStash()
    with deferring(layers, stash) if split else contextlib.nullcontext():
        got = torch.autograd.grad([loss], [x_BTD, *asked], allow_unused=True)
    deferred = len(stash)
    grads = {"input": got[0], **{names[id(p)]: g for p, g in zip(asked, got[1:]) if g is not None}}
    grads.update({names[k]: g for k, g in stash.compute().items()})
    return float(loss.detach()), grads, deferred


def _check_block(recompute: str) -> None:
    """A MoE block (the MLA, router, shared experts and combine compiled; GEMMs, dispatch and
    routed experts eager) against the same block run eagerly, one-call backward and B/W split."""
    cfg = _cfg()
    g = torch.Generator().manual_seed(3)
    x_BTD = torch.randn(2, 12, cfg.hidden_size, generator=g)
    with one_thread():
        eager, compiled = _model(cfg), _model(cfg)
        rope = eager.rope(12, device=x_BTD.device, dtype=x_BTD.dtype)
        eager_block, block = eager.layers["1"], compiled.layers["1"]
        assert apply_compile(block, backend="aot_eager") == 6  # 2 norms, MLA, router, shared experts, combine
        assert hasattr(block.self_attn.forward, "_torchdynamo_orig_callable")
        apply_recompute(eager_block, recompute)
        apply_recompute(block, recompute)
        ref = _block_grads(eager_block, x_BTD, rope, split=False)
        for split in (False, True):
            got = _block_grads(block, x_BTD, rope, split=split)
            _assert_close(ref, got)
            if split:  # every GEMM layer use handed its weight gradient to the stash
                assert got[2] == _block_grads(eager_block, x_BTD, rope, split=True)[2] > 0


def test_compiled_moe_block_matches_eager_with_bw_split() -> None:
    _check_block("none")


def test_compile_composes_with_recompute() -> None:
    """Compiled pieces under `memory.recompute=selective`: the checkpoints wrap the compiled
    attention and SwiGLU pieces; the numbers stay eager's."""
    model = _model(_cfg())
    apply_compile(model, backend="aot_eager")
    apply_recompute(model, "selective")
    mla = model.layers["0"].self_attn
    assert getattr(mla.forward, "recomputed", False) and hasattr(mla.forward.__wrapped__, "_torchdynamo_orig_callable")
    _check_block("selective")


def test_gemms_in_graph_refuse_a_split() -> None:
    """`eager_gemms=False`: a B/W split on that model raises instead of losing the weight gradients."""
    block = _model(_cfg()).layers["1"]
    apply_compile(block, backend="aot_eager", eager_gemms=False)
    with pytest.raises(RuntimeError, match="B/W split"), deferring(deferrable_layers(block), WeightGradStash()):
        pass


@pytest.mark.slow  # a second trace of the block (half a minute on a loaded 2-core machine)
def test_gemms_in_graph_match_eager_and_refuse_a_split() -> None:
    """`eager_gemms=False` (schedules without a B/W split): the GEMMs traced into the graphs, the
    same numbers; a B/W split on that model raises instead of losing the weight gradients."""
    cfg = _cfg()
    x_BTD = torch.randn(2, 12, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    with one_thread():
        eager, compiled = _model(cfg), _model(cfg)
        rope = eager.rope(12, device=x_BTD.device, dtype=x_BTD.dtype)
        block = compiled.layers["1"]
        apply_compile(block, backend="aot_eager", eager_gemms=False)
        assert "forward" not in vars(block.self_attn.q_a_proj)  # traced, not disabled
        _assert_close(_block_grads(eager.layers["1"], x_BTD, rope, split=False),
                      _block_grads(block, x_BTD, rope, split=False))
        with pytest.raises(RuntimeError, match="B/W split"):
            _block_grads(block, x_BTD, rope, split=True)


def test_executor_keeps_gemms_eager_exactly_for_split_schedules() -> None:
    from megads.parallel.executor import splits_backward

    assert [s for s in ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev") if splits_backward(s, pp=2)] == [
        "zb1p", "dualpipe", "dualpipev"]
    assert not splits_backward("dualpipev", pp=1)  # no pipeline: one full backward per micro-batch


def test_apply_compile_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="compile backend"):
        apply_compile(_model(_cfg()), backend="tensorrt")


@pytest.mark.slow  # the whole model traced (dense + MoE blocks, the MTP block's T-1 shapes): a minute
def test_compiled_model_matches_eager_with_bw_split() -> None:
    _check_against_eager("aot_eager")


@pytest.mark.slow  # inductor's C++ compilation: minutes on 2 cores; the aot_eager test above covers the tracing
def test_inductor_blocks_match_eager() -> None:
    _check_against_eager("inductor")


# ------------------------------------------------------------------------------------------------
# 4 gloo ranks, pp 2 x ep 2: a B/W-split schedule, DualPipeV with the overlapped F&B, 1F1B

OPTIM = OptimSettings(lr=1e-5, weight_decay=0.1, max_grad_norm=1.0, bias_update_speed=1e-3, bucket_numel=3000)


def _rank_cases(backend: str) -> list[ScheduleCase]:
    # zb1p and DualPipeV split B and W (GEMMs eager); 1F1B does not (GEMMs inside the graphs)
    return [ScheduleCase(2, 2, "zb1p", False, (min_microbatches("zb1p", pp=2),), compile=backend),
            ScheduleCase(2, 2, "dualpipev", True, (min_microbatches("dualpipev", pp=2),), compile=backend),
            ScheduleCase(2, 2, "1f1b", False, (min_microbatches("1f1b", pp=2),), compile=backend)]


def _run_ranks(backend: str, outdir: Path) -> None:
    cfg = tiny_config()  # 4 layers: two pieces per rank under DualPipeV
    cases = _rank_cases(backend)
    batches: dict[str, Any] = {}
    refs = {}
    with one_thread():
        for case in cases:
            sizes = case.global_batches(4)
            batches[case.tag] = make_step_batches(cfg, sizes=sizes, seq_len=12)
            refs[case.tag] = reference_with_grads(cfg, batches=batches[case.tag], mtp_weight=MTP_WEIGHT,
                                                  optim=OPTIM, seed=11)
    spawn(4, schedule_worker, cfg, cases, batches, MTP_WEIGHT, OPTIM, 11, str(outdir))
    for case in cases:
        problems, worst = compare_case(refs[case.tag], outdir=outdir, tag=case.tag, world=4, rtol=RTOL)
        assert not problems, f"worst relative difference {worst:.2e}\n" + "\n".join(problems[:20])


@pytest.mark.slow  # 4 ranks tracing on 2 cores; the one-process aot_eager tests cover the B/W split
def test_pp2_ep2_compiled_aot_eager_matches_one_process(tmp_path: Path) -> None:
    _run_ranks("aot_eager", tmp_path)


@pytest.mark.slow  # 4 ranks compiling with inductor on 2 cores: several minutes
def test_pp2_ep2_compiled_inductor_matches_one_process(tmp_path: Path) -> None:
    _run_ranks("inductor", tmp_path)


# ------------------------------------------------------------------------------------------------
# the config field


def _train_config(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from megads.train.config import register_configs, to_train_config

    register_configs()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base=None):
        return to_train_config(compose("config", overrides=list(overrides)))


def test_compile_config_field_validates_and_reaches_the_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    import megads.train.trainer as trainer
    from megads.train.config import ConfigError, validate_config

    assert _train_config().compile is False
    cfg = _train_config("compile=true", "device=cpu")
    validate_config(cfg, world_size=4)  # g++ is on this machine
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="compile=true on a CPU needs a C\\+\\+ compiler"):
        validate_config(cfg, world_size=4)
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="compile"):  # typed: a bool
        _train_config("compile=sometimes")
    # build_executor hands the field to the executor, which compiles before it recomputes
    seen: dict[str, Any] = {}
    monkeypatch.setattr(trainer, "ParallelExecutor", lambda *a, **k: seen.update(k))
    monkeypatch.setattr(trainer.ParallelMesh, "build", staticmethod(lambda *a, **k: None))
    env = trainer.DistEnv(rank=0, world_size=4, local_rank=0, local_world_size=4, master_addr="", master_port=0,
                          source="single")
    trainer.build_executor(cfg, env=env, device=torch.device("cpu"), autocast_dtype=None)
    assert seen["compile"] is True
