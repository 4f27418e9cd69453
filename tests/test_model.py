"""Model behaviour against independent references: brute-force routing, naive MoE, formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megads.model import DeepseekV3, ModelConfig, count_parameters
from megads.model.linear import GroupedLinear, LinearFactory
from megads.model.moe import MoE
from megads.model.router import Router
from tools.count_params import load_preset

TINY = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
    first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
    v_head_dim=8, num_nextn_predict_layers=1,
)


def brute_force_topk(scores_E: torch.Tensor, bias_E: torch.Tensor, cfg: ModelConfig) -> set[int]:
    """Group-limited top-k written from the paper's words, one token at a time."""
    choice = (scores_E + bias_E).tolist()
    per = cfg.n_routed_experts // cfg.n_group
    groups = [sorted(choice[g * per:(g + 1) * per], reverse=True) for g in range(cfg.n_group)]
    group_score = [g[0] + g[1] for g in groups]
    best_groups = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
    allowed = [e for g in best_groups for e in range(g * per, (g + 1) * per)]
    return set(sorted(allowed, key=lambda e: -choice[e])[: cfg.num_experts_per_tok])


def test_group_limited_routing_matches_brute_force() -> None:
    torch.manual_seed(0)
    router = Router(TINY)
    torch.nn.init.normal_(router.weight, std=1.0)
    router.e_score_correction_bias.uniform_(-0.3, 0.3)
    x = torch.randn(64, TINY.hidden_size)
    routing = router(x, seq_len=64)
    scores = torch.sigmoid(x @ router.weight.t())
    for t in range(64):
        assert set(routing.topk_idx_NK[t].tolist()) == brute_force_topk(scores[t], router.e_score_correction_bias, TINY)
        groups = {e // (TINY.n_routed_experts // TINY.n_group) for e in routing.topk_idx_NK[t].tolist()}
        assert len(groups) <= TINY.topk_group


def test_bias_changes_selection_never_gate_values() -> None:
    torch.manual_seed(1)
    router = Router(TINY)
    torch.nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(128, TINY.hidden_size)
    base = router(x, seq_len=128)
    router.e_score_correction_bias.copy_(torch.linspace(-0.5, 0.5, TINY.n_routed_experts))
    biased = router(x, seq_len=128)
    assert not torch.equal(base.topk_idx_NK.sort(-1).values, biased.topk_idx_NK.sort(-1).values)
    # gate values are the unbiased sigmoid scores of the selected experts, normalised, times scale
    s = torch.sigmoid(x @ router.weight.t()).gather(1, biased.topk_idx_NK)
    expected = s / s.sum(-1, keepdim=True) * TINY.routed_scaling_factor
    torch.testing.assert_close(biased.topk_weight_NK, expected, rtol=1e-6, atol=1e-7)
    # a bias that keeps the same selection leaves the gate values bit-identical
    router.e_score_correction_bias.fill_(0.37)
    shifted = router(x, seq_len=128)
    assert torch.equal(shifted.topk_idx_NK, base.topk_idx_NK)
    assert torch.equal(shifted.topk_weight_NK, base.topk_weight_NK)
    # the bias is a buffer: no optimizer ever sees it
    assert "e_score_correction_bias" not in dict(router.named_parameters())


def test_sequence_balance_loss_formula() -> None:
    torch.manual_seed(2)
    router = Router(TINY.replace(seq_aux_loss_alpha=0.01))
    torch.nn.init.normal_(router.weight, std=1.0)
    B, T = 3, 10
    x = torch.randn(B * T, TINY.hidden_size)
    routing = router(x, seq_len=T)
    s = torch.sigmoid(x @ router.weight.t()).view(B, T, -1)
    E, K = TINY.n_routed_experts, TINY.num_experts_per_tok
    idx = routing.topk_idx_NK.view(B, T, K)
    total = 0.0
    for b in range(B):
        f = [E / (K * T) * (idx[b] == i).sum().item() for i in range(E)]
        p = (s[b] / s[b].sum(-1, keepdim=True)).mean(0)
        total += sum(f[i] * p[i].item() for i in range(E))
    assert routing.balance_loss.item() == pytest.approx(0.01 * total / B, rel=1e-5)
    # it has a gradient through the scores (P_i), so the router learns from it
    routing.balance_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_moe_matches_naive_per_token_sum() -> None:
    torch.manual_seed(3)
    moe = MoE(TINY, factory=LinearFactory())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, TINY.hidden_size)
    out, _ = moe(x)
    routing = moe.gate(x.view(-1, TINY.hidden_size), seq_len=7)
    ref = []
    for t, xt in enumerate(x.view(-1, TINY.hidden_size)):
        acc = moe.shared_experts(xt)
        for k in range(TINY.num_experts_per_tok):
            e = routing.topk_idx_NK[t, k]
            gate_up = moe.experts.gate_up_proj.weight[e] @ xt
            g, u = gate_up.chunk(2)
            acc = acc + routing.topk_weight_NK[t, k] * (moe.experts.down_proj.weight[e] @ (F.silu(g) * u))
        ref.append(acc)
    torch.testing.assert_close(out.view(-1, TINY.hidden_size), torch.stack(ref), rtol=1e-5, atol=1e-5)


def test_grouped_linear_handles_empty_experts_and_gradients() -> None:
    torch.manual_seed(4)
    lin = GroupedLinear(4, 6, 5)
    counts = [3, 0, 4, 0]
    x = torch.randn(7, 6, requires_grad=True)
    y = lin(x, counts)
    ref = torch.cat([x[:3] @ lin.weight[0].t(), x[3:] @ lin.weight[2].t()])
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    assert lin.weight.grad[1].abs().sum() == 0 and lin.weight.grad[0].abs().sum() > 0
    empty = lin(torch.zeros(0, 6), [0, 0, 0, 0])
    assert empty.shape == (0, 5)


def test_grouped_linear_follows_autocast_like_linear() -> None:
    """Under bf16 autocast the experts' GEMMs run in bf16 (as nn.Linear's do); grads stay fp32."""
    torch.manual_seed(6)
    lin = GroupedLinear(3, 8, 5)
    counts = [2, 3, 1]
    x = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x, counts)
        starts = [0, 2, 5]
        ref = torch.cat([F.linear(x[s:s + n], lin.weight[e]) for e, (s, n) in enumerate(zip(starts, counts))])
    assert y.dtype == torch.bfloat16 and ref.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref)  # same bf16 GEMMs, same rounding
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    g_out = torch.ones(6, 5, dtype=torch.bfloat16)
    x_bf, w_bf = x.detach().bfloat16(), lin.weight.detach().bfloat16()
    ref_gw = torch.stack([(g_out[s:s + n].t() @ x_bf[s:s + n]).float() for s, n in zip(starts, counts)])
    torch.testing.assert_close(lin.weight.grad, ref_gw)
    ref_gx = torch.cat([(g_out[s:s + n] @ w_bf[e]).float() for e, (s, n) in enumerate(zip(starts, counts))])
    torch.testing.assert_close(x.grad, ref_gx)


def test_moe_dispatches_in_the_autocast_dtype_with_the_same_result() -> None:
    torch.manual_seed(7)
    moe = MoE(TINY, factory=LinearFactory())
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, TINY.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = moe.route(x)
        dispatched = moe.dispatch(x, routing)
        assert dispatched.x_MD.dtype == torch.bfloat16  # half the all-to-all bytes
        out = moe.combine(moe.experts_forward(dispatched), dispatched, routing, x)
        # the float32 rows give the same output: the experts' GEMM casts them to bf16 itself
        rows_fp32 = moe.dispatcher.dispatch(x.reshape(-1, TINY.hidden_size), routing.topk_idx_NK)
        assert rows_fp32.x_MD.dtype == torch.float32
        ref = moe.combine(moe.experts_forward(rows_fp32), rows_fp32, routing, x)
    assert torch.isfinite(out).all() and torch.equal(out, ref)


def test_moe_with_zero_tokens() -> None:
    moe = MoE(TINY, factory=LinearFactory())
    out, balance = moe(torch.zeros(0, 5, TINY.hidden_size))
    assert out.shape == (0, 5, TINY.hidden_size)


def test_block_steps_equal_forward() -> None:
    torch.manual_seed(5)
    model = DeepseekV3(TINY)
    block = model.layers["2"]
    assert block.is_moe
    x = torch.randn(2, 9, TINY.hidden_size)
    rope = model.rope(9, device=x.device, dtype=x.dtype)
    full, balance = block(x, rope)
    h = block.attention_step(x, rope)
    f = block.ffn_input(h)
    routing = block.mlp.route(f)
    dispatched = block.mlp.dispatch(f, routing)
    y = block.mlp.experts_forward(dispatched)
    stepped = h + block.mlp.combine(y, dispatched, routing, f)
    torch.testing.assert_close(stepped, full, rtol=0, atol=0)


def test_causality_and_mtp_alignment() -> None:
    """Logit at i and MTP-1 logit at i may only see tokens <= i and <= i+1 respectively."""
    torch.manual_seed(6)
    model = DeepseekV3(TINY).eval()
    ids = torch.randint(0, TINY.vocab_size, (1, 12))
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 1) % TINY.vocab_size
    with torch.no_grad():
        a, b = model(ids), model(changed)
    # (SDPA's blocked kernels leave ~1e-9 noise; a real dependence moves logits by >1e-3)
    torch.testing.assert_close(a.logits[:, :8], b.logits[:, :8], rtol=0, atol=1e-6)
    assert (a.logits[:, 8] - b.logits[:, 8]).abs().max() > 1e-3
    # depth 1 at position i embeds token i+1: position 7 sees token 8, position 6 does not
    torch.testing.assert_close(a.mtp_logits[0][:, :7], b.mtp_logits[0][:, :7], rtol=0, atol=1e-6)
    assert (a.mtp_logits[0][:, 7] - b.mtp_logits[0][:, 7]).abs().max() > 1e-3
    assert a.mtp_logits[0].shape == (1, 11, TINY.vocab_size)


def test_loss_combines_terms_and_trains() -> None:
    torch.manual_seed(7)
    model = DeepseekV3(TINY)
    ids = torch.randint(0, TINY.vocab_size, (4, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    out = model.compute_loss(x, y, mtp_weight=0.3)
    assert out.total.item() == pytest.approx((out.lm + out.balance + 0.3 * out.mtp).item(), rel=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out.total.item()
    for _ in range(30):
        opt.zero_grad()
        loss = model.compute_loss(x, y, mtp_weight=0.3)
        loss.total.backward()
        opt.step()
    assert loss.total.item() < 0.7 * first


def test_671b_preset_matches_public_counts() -> None:
    counts = count_parameters(load_preset("deepseek_v3_671b"))
    assert abs(counts.total - 671e9) / 671e9 < 0.01
    # the public "37B activated" is rounded to the billion; see docs/model.md for the convention
    assert round(counts.activated / 1e9) == 37
    assert abs((counts.total + counts.mtp_stored) - 685e9) / 685e9 < 0.01


def test_counts_match_allocated_model() -> None:
    for cfg in (TINY, TINY.replace(q_lora_rank=None, num_nextn_predict_layers=2)):
        counts = count_parameters(cfg)
        model = DeepseekV3(cfg)
        main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
        assert (main, mtp) == (counts.total, counts.mtp)


@pytest.mark.parametrize(
    "changes,needle",
    [
        ({"n_routed_experts": 10, "n_group": 4}, "n_routed_experts=10 must split evenly into n_group=4"),
        ({"topk_group": 5}, "topk_group=5"),
        ({"num_experts_per_tok": 5, "topk_group": 1}, "num_experts_per_tok=5"),
        ({"qk_rope_head_dim": 5}, "qk_rope_head_dim=5 must be even"),
        ({"first_k_dense_replace": 4}, "first_k_dense_replace=4"),
    ],
)
def test_config_validation_messages(changes: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        TINY.replace(**changes).validate()


def test_every_gemm_but_the_head_goes_through_the_factory() -> None:
    made: list[tuple[str, tuple[int, ...]]] = []

    class Recording(LinearFactory):
        def linear(self, in_features, out_features, *, bias=False):
            made.append(("linear", (in_features, out_features)))
            return super().linear(in_features, out_features, bias=bias)

        def grouped(self, num, in_features, out_features):
            made.append(("grouped", (num, in_features, out_features)))
            return super().grouped(num, in_features, out_features)

    model = DeepseekV3(TINY, factory=Recording())
    # every linear but the output head, which stays in high precision under FP8 (docs/fp8.md)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules()) - 1
    n_grouped = sum(isinstance(m, GroupedLinear) for m in model.modules())
    assert sum(k == "linear" for k, _ in made) == n_linear
    assert sum(k == "grouped" for k, _ in made) == n_grouped


@pytest.mark.parametrize("shape", [(2, 16, 32), (3, 7, 96), (5, 33)])
def test_rms_norm_is_transformers_bit_for_bit(shape: tuple[int, ...]) -> None:
    """The fused float32 path (F.rms_norm) gives transformers' DeepseekV3RMSNorm's output and
    gradients bit for bit; so does the explicit path (other dtypes, here a bf16 input)."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    from megads.model.norm import RMSNorm

    gen = torch.Generator().manual_seed(len(shape))
    ours, ref = RMSNorm(shape[-1], eps=1e-6), DeepseekV3RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(shape[-1], generator=gen))
        ours.weight.copy_(ref.weight)
    x, g = torch.randn(*shape, generator=gen) * 3, torch.randn(*shape, generator=gen)
    for dtype in (torch.float32, torch.bfloat16):
        out = []
        for norm in (ours, ref):
            norm.weight.grad = None
            xr = x.detach().clone().to(dtype).requires_grad_()
            y = norm(xr)
            y.backward(g.to(y.dtype))
            out.append((y, xr.grad, norm.weight.grad))
        for a, b in zip(*out):
            assert a.dtype == b.dtype and torch.equal(a, b), dtype
