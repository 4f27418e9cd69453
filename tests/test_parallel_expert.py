"""Expert-parallel dispatch/combine on real gloo ranks: identity round trip, routing, autograd."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megads.parallel.expert_parallel import AllToAllDispatcher
from megads.testing.parallel import spawn

E, K, D = 8, 3, 5


def _routing(seed: int, n: int, *, ep: int) -> torch.Tensor:
    """Random top-K routing that never picks experts 1 and 6 nor any expert of the last ep rank."""
    g = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(E) if e not in (1, 6) and e // (E // ep) != ep - 1]
    scores = torch.rand(n, len(allowed), generator=g)
    pick = scores.topk(K, dim=-1).indices
    return torch.tensor(allowed)[pick]


def _worker(rank: int, world: int) -> None:
    ep = world
    group = dist.group.WORLD
    disp = AllToAllDispatcher(E, group=group, ep_size=ep, ep_rank=rank)
    # Rank 1 sends no token at all (N = 0); the last rank's experts receive nothing.
    n = 0 if rank == 1 else 4 + 3 * rank
    idx_NK = _routing(rank, n, ep=ep)
    x_ND = torch.randn(n, D, generator=torch.Generator().manual_seed(100 + rank), requires_grad=True)

    # 1. identity round trip through the asynchronous handles, with work in between.
    handle = disp.dispatch_start(x_ND, idx_NK)
    _ = torch.randn(64, 64) @ torch.randn(64, 64)  # "other compute" while the all-to-all flies
    res = handle.wait()
    assert len(res.counts) == E // ep and sum(res.counts) == res.x_MD.shape[0]
    y_NKD = disp.combine_start(res.x_MD, res).wait()
    assert y_NKD.shape == (n, K, D)
    assert torch.equal(y_NKD, x_ND.detach().unsqueeze(1).expand(n, K, D))

    # 2. every received row sits in the slice of the local expert it was routed to: tag each row
    #    with its global expert id and check against the slice boundaries.
    tags_ND = idx_NK.float().unsqueeze(-1).expand(n, K, D).reshape(n * K, D)
    # dispatch tagged (token, k) pairs: one token per pair so the tag is per pair
    pair_idx = idx_NK.reshape(-1, 1)
    got = disp.dispatch(tags_ND, pair_idx)
    lo = rank * (E // ep)
    for j, part in enumerate(torch.split(got.x_MD, got.counts)):
        assert torch.all(part[:, 0] == lo + j), (rank, j, part[:, 0])
    if rank == ep - 1:
        assert sum(got.counts) == 0
    disp.combine(got.x_MD, got)

    # 3. autograd: experts scale rows by (1 + global expert id); gradient of sum(combine) w.r.t.
    #    x is sum_k (1 + e_k) per token (backward = reverse all-to-alls).
    res = disp.dispatch(x_ND, idx_NK)
    scale_M = torch.cat([torch.full((c,), 1.0 + lo + j) for j, c in enumerate(res.counts)]) if res.counts else torch.zeros(0)
    y = disp.combine(res.x_MD * scale_M.unsqueeze(-1), res)
    y.sum().backward()
    want = (1.0 + idx_NK.float()).sum(-1, keepdim=True).expand(n, D)
    assert x_ND.grad is not None and torch.allclose(x_ND.grad, want), (x_ND.grad, want)

    # 4. node-limited diagnostics: 2 ranks per node -> 2 nodes of 4 experts.
    disp2 = AllToAllDispatcher(E, group=group, ep_size=ep, ep_rank=rank, ranks_per_node=2)
    nodes = disp2.nodes_reached(torch.tensor([[0, 1, 2], [0, 5, 7]]))
    assert nodes.tolist() == [1, 2]


def test_dispatch_combine_round_trip_on_four_ranks() -> None:
    spawn(4, _worker)
