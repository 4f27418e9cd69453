"""ZeRO-1 on 4 real gloo ranks: state bytes = total/dp, exact AdamW + clipping, bf16 moments;
checkpoints by parameter name through torch.distributed.checkpoint (resume with another bucket
size / moments dtype / sharding, new hyper-parameters in force, a missing parameter refused by
name)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megads.checkpoint.dcp import load_state, read_tensors, save_state
from megads.checkpoint.state import zero1_entries
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


def test_zero1_matches_adamw_and_shards_state() -> None:
    spawn(4, _worker)


# ------------------------------------------------------------------------------------------------
# checkpoints by parameter name
#
# Dense parameters over dp = 4, the "experts" parameter over the edp pairs {0,2} / {1,3}: both ep
# ranks name their (different) experts "experts", as shard_experts does. Sizes are chosen so that
# the old bucket-keyed loader, which only compared shard lengths, would have accepted the bucket
# changes below (decay: 96 + 84 -> 45 elements per rank either way; no_decay: 12 + 7 -> 5) and
# silently loaded the elements of other parameters. Gradients are multiples of 1/64, so their
# sums are exact in any order and a continued step can be compared bit for bit.

KEYS = ("master", "exp_avg", "exp_avg_sq")
A_BUCKET = 40
B_LAYOUTS = (  # (bucket_numel, shard): one bucket per space splits 0.weight/2.weight across ranks anew
    (1 << 20, True),
    (7, True),
    (A_BUCKET, False),
)


def _named_model(rank: int, *, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 7))
    torch.manual_seed(seed + 1 + rank % 2)  # this ep rank's experts
    m.experts = nn.Parameter(torch.randn(3, 11) * 0.1)  # type: ignore[attr-defined]
    return m


def _opt(
    m: nn.Module, edp: dist.ProcessGroup, *, bucket: int, moments: torch.dtype, shard: bool = True,
    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1,
) -> Zero1AdamW:
    named = list(m.named_parameters())
    decay = [(n, p) for n, p in named if p.ndim > 1]
    no_decay = [(n, p) for n, p in named if p.ndim <= 1]
    groups = [  # as megads.train.optim.param_groups_for builds them
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "group": "decay", "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "group": "no_decay", "weight_decay": 0.0},
    ]
    return Zero1AdamW(
        groups, lr=0.05, betas=betas, eps=eps, edp_group=edp, expert_params=[m.experts],  # type: ignore[attr-defined]
        moments_dtype=moments, bucket_numel=bucket, shard=shard,
    )


def _grad(i: int, shape: torch.Size, step: int, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + i)
    return torch.randint(-32, 33, shape, generator=g).float() / 64


def _step(m: nn.Module, opt: Zero1AdamW, step: int, rank: int) -> dict[str, torch.Tensor]:
    for i, (_, p) in enumerate(m.named_parameters()):
        p.grad = _grad(i, p.shape, step, rank)
    opt.step()
    opt.zero_grad()
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _entries(opt: Zero1AdamW, rank: int) -> dict:
    """The trainer's optimizer entries (ep = 2: rank r holds expert shard r % 2) and its meta."""
    return {**zero1_entries(opt, ep=2, ep_rank=rank % 2),
            "optim.meta": {"step": opt.step_count, "hyperparameters": opt.hyperparameters()}}


def _load(opt: Zero1AdamW, folder: Path, rank: int) -> dict:
    entries = {**zero1_entries(opt, ep=2, ep_rank=rank % 2), "optim.meta": None}
    load_state(folder, entries)
    meta = entries["optim.meta"]
    opt.restore(step=meta["step"], hyperparameters=meta["hyperparameters"])
    return meta["hyperparameters"]


def _full(folder: Path, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's whole saved state (this ep rank's experts) from the checkpoint folder."""
    flat = read_tensors(folder, prefix="optim.")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        name, k = key.rsplit(".", 1)
        if name == "experts":  # the global [2 * 33] flat tensor of both ep ranks' shards
            t = t.view(2, -1)[rank % 2]
        out.setdefault(name, {})[k] = t
    return out


def _views(opt: Zero1AdamW) -> dict[str, tuple[int, int, dict[str, torch.Tensor]]]:
    return {n: (lo, hi, v) for n, (lo, hi, _numel, _kind, v) in opt.shard_views().items()}


def _raises(fn: Callable[[], object], *needles: str) -> str:
    """ValueError on every rank: this rank's own names `needles`, or says another rank failed."""
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "other rank" in msg or all(n in msg for n in needles), (needles, msg)
    return msg


def _check_layouts(rank: int, edp: dist.ProcessGroup, moments_a: torch.dtype, folder: Path,
                   full: dict, at2: dict, at3: dict, full3: dict) -> None:
    """(a) resume with another bucket layout / sharding / moments dtype; `full3`: the state after
    the uninterrupted run's next step."""
    other = torch.bfloat16 if moments_a == torch.float32 else torch.float32
    for bucket, shard in B_LAYOUTS:
        for moments_b in (moments_a, other):
            mb = _named_model(rank, seed=7)  # other values: the load must set every element
            ob = _opt(mb, edp, bucket=bucket, moments=moments_b, shard=shard)
            _load(ob, folder, rank)
            assert ob.step_count == 2
            for name, (lo, hi, v) in _views(ob).items():
                assert torch.equal(v["master"], full[name]["master"][lo:hi]), (bucket, name)
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(v[k], full[name][k][lo:hi].to(moments_b)), (bucket, moments_b, name, k)
            for n, p in mb.named_parameters():
                assert torch.equal(p, at2[n]), (bucket, n)
            got = _step(mb, ob, 2, rank)
            for n in at3:
                if moments_b == moments_a:
                    assert torch.equal(got[n], at3[n]), (bucket, shard, moments_b, n)
                else:  # the other dtype's update arithmetic
                    torch.testing.assert_close(got[n], at3[n], rtol=0, atol=1e-3)
            if moments_b == moments_a:  # the whole state continues bit for bit, moments included
                for name, (lo, hi, v) in _views(ob).items():
                    for k in KEYS:
                        assert torch.equal(v[k], full3[name][k][lo:hi]), (bucket, shard, name, k)


def _check_new_hyperparameters(rank: int, edp: dist.ProcessGroup, folder: Path, full: dict,
                               at3: dict, saved_hp: dict) -> None:
    """(b) the new launch's betas / eps / weight_decay apply from the resumed step."""
    world = dist.get_world_size()
    mc = _named_model(rank, seed=7)
    oc = _opt(mc, edp, bucket=7, moments=torch.float32, betas=(0.5, 0.6), eps=1e-2, weight_decay=5.0)
    saved = _load(oc, folder, rank)
    assert saved == saved_hp == oc.loaded_hyperparameters
    assert saved["decay"] == {"lr": 0.05, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    assert oc.hyperparameter_changes() == {
        "decay.betas": ((0.9, 0.95), (0.5, 0.6)), "decay.eps": (1e-8, 1e-2), "decay.weight_decay": (0.1, 5.0),
        "no_decay.betas": ((0.9, 0.95), (0.5, 0.6)), "no_decay.eps": (1e-8, 1e-2),
    }
    assert oc.param_groups[0]["weight_decay"] == 5.0 and oc.param_groups[0]["betas"] == (0.5, 0.6)
    got = _step(mc, oc, 2, rank)
    pair = [rank % 2, rank % 2 + 2]
    for i, (n, p) in enumerate(mc.named_parameters()):
        # torch's AdamW with the new values on the saved state and the summed gradient
        ref = nn.Parameter(full[n]["master"].clone().view_as(p))
        ropt = torch.optim.AdamW([ref], lr=0.05, betas=(0.5, 0.6), eps=1e-2, weight_decay=5.0 if p.ndim > 1 else 0.0)
        ropt.state[ref] = {
            "step": torch.tensor(2.0), "exp_avg": full[n]["exp_avg"].clone().view_as(p),
            "exp_avg_sq": full[n]["exp_avg_sq"].clone().view_as(p),
        }
        ref.grad = sum(_grad(i, p.shape, 2, r) for r in (pair if n == "experts" else range(world)))
        ropt.step()
        torch.testing.assert_close(got[n], ref.detach(), rtol=1e-6, atol=1e-7)
        assert (got[n] - at3[n]).abs().max() > 1e-3, n  # not the saved hyper-parameters' update


def _check_refusals(rank: int, edp: dist.ProcessGroup, folder: Path) -> None:
    """(c) a parameter the checkpoint lacks is refused by name, on every rank."""
    m = _named_model(rank, seed=7)
    m.extra = nn.Parameter(torch.zeros(5))  # type: ignore[attr-defined]
    opt = _opt(m, edp, bucket=1 << 20, moments=torch.float32)
    # the ranks that own elements of `extra` name the keys; the others say that another rank lacks keys
    owns_extra = any(k.startswith("optim.extra.") for k in zero1_entries(opt, ep=2, ep_rank=rank % 2))
    named = r"holds no optim\.extra\.exp_avg, optim\.extra\.exp_avg_sq, optim\.extra\.master"
    with pytest.raises(ValueError, match=named if owns_extra else r"lacks keys other ranks need"):
        _load(opt, folder, rank)
    owners = torch.tensor([int(owns_extra)])
    dist.all_reduce(owners)
    assert int(owners) >= 1  # some rank named the keys


def _resume_worker(rank: int, world: int, ckpt_dir: str) -> None:
    edp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    for moments_a in (torch.float32, torch.bfloat16):
        folder = Path(ckpt_dir) / f"{moments_a}".replace("torch.", "")
        ma = _named_model(rank, seed=0)
        oa = _opt(ma, edp, bucket=A_BUCKET, moments=moments_a)
        at2 = {}
        for step in range(2):
            at2 = _step(ma, oa, step, rank)
        save_state(folder / "at2", _entries(oa, rank))
        full = _full(folder / "at2", rank)
        for n, p in ma.named_parameters():  # the saved ranges hold the right elements
            assert torch.equal(full[n]["master"], p.detach().reshape(-1)), n
        at3 = _step(ma, oa, 2, rank)  # the uninterrupted run
        save_state(folder / "at3", _entries(oa, rank))
        _check_layouts(rank, edp, moments_a, folder / "at2", full, at2, at3, _full(folder / "at3", rank))
        if moments_a == torch.float32:
            _check_new_hyperparameters(rank, edp, folder / "at2", full, at3, oa.hyperparameters())
            _check_refusals(rank, edp, folder / "at2")


def test_zero1_checkpoint_by_name_survives_layout_changes(tmp_path: Path) -> None:
    spawn(4, _resume_worker, str(tmp_path))
