"""ZeRO-1 on 4 real gloo ranks: state bytes = total/dp, exact AdamW + clipping, bf16 moments."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megads.parallel.zero1 import Zero1AdamW
from megads.testing.parallel import spawn

STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes so buckets need padding; "experts" is sharded over a different group
    m = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 5, bias=False))
    m.experts = nn.Parameter(torch.randn(6, 11) * 0.1)  # type: ignore[attr-defined]
    return m


def _loss(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (m(x) ** 2).mean() + (m.experts.sum(0) ** 2).mean() * x.abs().mean()  # type: ignore[attr-defined]


def _data(step: int, rank: int) -> torch.Tensor:
    return torch.randn(6, 7, generator=torch.Generator().manual_seed(1000 * step + rank)) * 3.0


def _reference(world: int) -> nn.Module:
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    for step in range(STEPS):
        for r in range(world):
            (_loss(m, _data(step, r)) / world).backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
    return m


def _worker(rank: int, world: int) -> None:
    # dense over all 4 ranks; the expert parameter over pairs {0,2} / {1,3} (edp of ep=2)
    edp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    ref = _reference(world)
    for moments in (torch.float32, torch.bfloat16):
        m = _model()
        # ep = 2: rank r holds expert rows [3*(r%2), 3*(r%2)+3) as its own parameter
        lo = 3 * (rank % 2)
        full = m.experts
        mine = nn.Parameter(full.detach()[lo : lo + 3].clone())
        del m.experts
        m.experts = full.detach()  # a plain tensor attribute from here on (not a parameter)
        m.register_parameter("experts_local", mine)
        opt = Zero1AdamW(
            m.parameters(), lr=0.05, betas=(0.9, 0.95), weight_decay=0.1, dp_group=None,
            edp_group=edp_groups[rank % 2], expert_params=[mine], max_grad_norm=0.5,
            moments_dtype=moments, bucket_numel=40,
        )
        total = sum(p.numel() for p in m.parameters())
        dense = total - mine.numel()
        per = 4 + 2 * (4 if moments == torch.float32 else 2)
        # measured from the tensors: master + both moments, dense sharded 4 ways, expert 2 ways
        got = opt.state_bytes()
        want = per * (dense / 4 + mine.numel() / 2)
        n_buckets = sum(len(sp.buckets) for sp in opt.spaces)
        assert want <= got <= want + per * n_buckets, (got, want)
        if moments == torch.float32:
            # without the expert group twist: every space over dp=4 -> exactly total/dp (+padding)
            plain_model = _model()
            plain = Zero1AdamW(plain_model.parameters(), lr=0.1, bucket_numel=40)
            total = sum(p.numel() for p in plain_model.parameters())
            assert per * total / 4 <= plain.state_bytes() <= per * (total / 4 + len(plain.spaces[0].buckets))
        for step in range(STEPS):
            # emulate expert parallelism: the full expert tensor is rebuilt from the current
            # local slices; its gradient summed over all ranks (what the all-to-all backward
            # brings) is split by slice, halved because the edp pair SUMs two copies
            halves = [torch.empty(3, 11) for _ in range(world)]
            dist.all_gather(halves, mine.detach())
            m.experts = torch.cat(halves[:2]).requires_grad_(True)
            (_loss(m, _data(step, rank)) / world).backward()
            g = m.experts.grad.clone()
            dist.all_reduce(g)
            mine.grad = g[lo : lo + 3] / 2
            opt.step()
            opt.zero_grad()
        tol = 1e-6 if moments == torch.float32 else 2e-2
        ref_params = dict(ref.named_parameters())
        for name, p in m.named_parameters():
            q = ref_params["experts"][lo : lo + 3] if name == "experts_local" else ref_params[name]
            rel = float((p - q).norm() / q.norm())
            assert rel < tol, (moments, name, rel)
        # every replica holds the same parameters after the all-gather
        for p in m.parameters():
            copies = [torch.empty_like(p) for _ in range(world)]
            dist.all_gather(copies, p.detach().contiguous())
            group_of = [0, 1, 0, 1] if p is mine else [0, 0, 0, 0]
            for r in range(world):
                if group_of[r] == group_of[rank]:
                    assert torch.equal(copies[r], p)
        # checkpoint round trip
        state = opt.state_dict()
        opt2 = Zero1AdamW(_model().parameters(), lr=0.05, edp_group=edp_groups[rank % 2],
                          expert_params=[], bucket_numel=40, moments_dtype=moments)
        try:
            opt2.load_state_dict(state)
            raise AssertionError("a checkpoint of another layout must be refused")
        except ValueError as e:
            assert "same layout" in str(e) or "parameter spaces" in str(e)


def test_zero1_matches_adamw_and_shards_state() -> None:
    spawn(4, _worker)
