"""Auxiliary-loss-free balancing: the sign update of megads.model.balance.update_expert_bias.

References: the update rule of DeepSeek-V3 §2.1.2 written out by hand, and the acceptance
criterion of issue 2 (a Router alone on skewed synthetic inputs reaches max/mean load < 1.3
within a few hundred bias updates, with the SPEC's gamma = 0.001 and no gradient training).
"""

from __future__ import annotations

import torch

from megads.model import DeepseekV3, ModelConfig
from megads.model.balance import routers, update_expert_bias
from megads.model.router import Router
from megads.train.config import OptimConfig
from megads.train.optim import param_groups_for


def _toy_router() -> tuple[Router, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2)
    router = Router(cfg).eval()
    torch.nn.init.normal_(router.weight, std=0.2)
    # skew: every token leans towards the direction of experts 0..2
    direction = router.weight[:3].sum(0).detach()
    mu_D = 1.5 * direction / direction.norm()
    return router, mu_D


def _imbalance_trajectory(gamma: float, steps: int) -> list[float]:
    router, mu_D = _toy_router()
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x_ND = torch.randn(2048, 32, generator=g) + mu_D
        with torch.no_grad():
            router(x_ND, seq_len=2048)
        (stats,) = update_expert_bias(router, gamma=gamma).values()
        out.append(stats.imbalance)
    return out


def test_bias_update_balances_toy_routing_problem() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: extra threads only contend on a loaded machine
    try:
        traj = _imbalance_trajectory(1e-3, 300)
        control = _imbalance_trajectory(0.0, 20)
    finally:
        torch.set_num_threads(threads)
    assert traj[0] > 2.5, traj[0]  # the problem is skewed to begin with
    tail = traj[250:]
    assert max(tail) < 1.3, tail
    # control: without the update the load stays skewed (the test can fail)
    assert min(control) > 2.5


def test_sign_update_matches_rule_and_resets_counts() -> None:
    cfg = ModelConfig(hidden_size=8, n_routed_experts=4, num_experts_per_tok=1, n_group=2, topk_group=2)
    router = Router(cfg)
    router.e_score_correction_bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.0]))
    router.tokens_per_expert.copy_(torch.tensor([10.0, 2.0, 4.0, 4.0]))  # mean 5
    stats = update_expert_bias(router, gamma=0.1)
    expected = torch.tensor([0.5 - 0.1, 0.0 + 0.1, -0.5 + 0.1, 0.0 + 0.1])
    torch.testing.assert_close(router.e_score_correction_bias, expected)
    assert router.tokens_per_expert.sum() == 0
    (s,) = stats.values()
    assert (s.max, s.mean, s.min) == (10.0, 5.0, 2.0) and s.imbalance == 2.0
    # an expert exactly at the mean keeps its bias; gamma = 0 changes nothing but still resets
    router.tokens_per_expert.copy_(torch.tensor([5.0, 5.0, 6.0, 4.0]))
    update_expert_bias(router, gamma=0.0)
    torch.testing.assert_close(router.e_score_correction_bias, expected)
    router.tokens_per_expert.copy_(torch.tensor([5.0, 5.0, 6.0, 4.0]))
    update_expert_bias(router, gamma=0.1)
    torch.testing.assert_close(router.e_score_correction_bias, expected + torch.tensor([0.0, 0.0, -0.1, 0.1]))


def test_counts_pass_through_all_reduce_once() -> None:
    """The rule uses the counts as summed by `all_reduce` (here: a second replica's counts added)."""
    cfg = ModelConfig(vocab_size=32, hidden_size=8, intermediate_size=16, moe_intermediate_size=8,
                      num_hidden_layers=3, num_attention_heads=2, n_routed_experts=4, kv_lora_rank=4,
                      q_lora_rank=None, qk_rope_head_dim=4, v_head_dim=4, qk_nope_head_dim=4, n_group=2,
                      topk_group=2, num_experts_per_tok=1, first_k_dense_replace=1, num_nextn_predict_layers=1)
    model = DeepseekV3(cfg)
    found = routers(model)
    assert len(found) == 3  # two MoE layers and the MTP block
    other = torch.tensor([0.0, 0.0, 0.0, 12.0])
    calls = []

    def add_other_rank(t_RE: torch.Tensor) -> None:
        calls.append(t_RE.shape)
        t_RE += other

    for r in found.values():
        r.tokens_per_expert.copy_(torch.tensor([3.0, 3.0, 3.0, 3.0]))  # balanced locally
    stats = update_expert_bias(model, gamma=0.01, all_reduce=add_other_rank)
    assert calls == [torch.Size([3, 4])]  # one collective for all routers
    for name, r in found.items():
        torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([0.01, 0.01, 0.01, -0.01]))
        assert stats[name].max == 15.0


def test_bias_is_never_an_optimizer_parameter() -> None:
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
                      num_hidden_layers=2, num_attention_heads=2, n_routed_experts=4, kv_lora_rank=8,
                      q_lora_rank=8, qk_rope_head_dim=4, v_head_dim=4, qk_nope_head_dim=4, n_group=2,
                      topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)
    model = DeepseekV3(cfg)
    groups = param_groups_for(model.named_parameters(), OptimConfig())
    in_groups = {id(p) for g in groups for p in g["params"]}
    for r in routers(model).values():
        assert id(r.e_score_correction_bias) not in in_groups
        assert id(r.weight) in in_groups
    assert len(in_groups) == sum(1 for _ in model.parameters())
    no_decay = next(g for g in groups if g["group"] == "no_decay")
    assert no_decay["weight_decay"] == 0.0
    assert all(n.endswith("norm.weight") or n.endswith("bias") for n in no_decay["names"]), no_decay["names"]
