"""ZeRO-1 AdamW on flat buffers: FP32 master weights and moments sharded over data parallelism.

Parameters are grouped into *spaces*, one per (optimizer param group, kind):

    dense   replicated over the stage's dp group; state sharded over dp
    expert  this rank's routed experts, replicated over the edp group; state sharded over edp
    tied    the embedding when the last pipeline stage keeps a copy for MTP: sharded over dp like
            dense, and after the reduce-scatter its gradient shard is all-reduced over the embed
            group (first + last stage), so both copies take the same update (Megatron's tied
            embeddings); its norm is counted on the first stage only

Each space is cut into buckets of about `bucket_numel` elements (a parameter never straddles
two buckets); a bucket is padded to a multiple of the group size g and rank i owns the i-th
1/g of every bucket. A step is

    1. gradients: every bucket's FP32 flat gradient (params' .grad copied in, zeros for params
       without a gradient) is reduce-scattered (SUM) asynchronously, bucket after bucket, so
       copying bucket b+1 overlaps the exchange of bucket b (`reduce_gradients`); a pipeline
       stage starts the buckets of a chunk as soon as that chunk's last backward is done
       (`mark_ready`); the loss was already scaled by 1/(micro-batches * dp), so the SUM is the
       mean gradient
    2. global gradient norm: squared norms of the owned shards summed over the whole world
       (stages, dp and ep together) -> clip coefficient min(1, max_norm / (norm + 1e-6))
    3. AdamW on the owned shard, in FP32: with float32 moments the shard is the one parameter
       of an inner `torch.optim.AdamW(fused=True)` whose state tensors are our moment shards (one
       kernel pass over the shard, on CPU and GPU); with bfloat16 moments the same update is
       computed in FP32 chunk by chunk and the moments are stored back in bfloat16
    4. all-gather of the updated shards into every replica's parameters

Why not DeepSpeed's stage-1 optimizer: see docs/parallel.md (it reads its expert/data groups
from DeepSpeed's module-global `groups`, expects its engine to drive accumulation boundaries,
and takes the model-parallel norm through an `mpu` object).

With `shard=False` the same code all-reduces buckets and every rank updates everything (plain
data parallel, for comparison).

Shapes: flat buffers are 1-D; `P` padded bucket length, `P/g` one rank's shard of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class _Bucket:
    params: list[nn.Parameter]
    offsets: list[int]  # start of each param inside the padded bucket
    numel: int  # used elements
    padded: int  # multiple of the group size
    shard_offset: int  # start of this rank's shard inside the space's flat shard


@dataclass
class _Space:
    kind: str  # dense | expert | tied
    group_index: int
    group: dist.ProcessGroup | None
    group_size: int
    group_rank: int
    shard: bool
    buckets: list[_Bucket] = field(default_factory=list)
    master: torch.Tensor | None = None  # fp32, this rank's shard of every bucket, concatenated
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    grad: torch.Tensor | None = None  # fp32 reduced gradient shard (= grad_buf while a step is open)
    grad_buf: torch.Tensor | None = None
    pending: list[Any] = field(default_factory=list)
    fused: tuple[torch.optim.Optimizer, nn.Parameter] | None = None  # inner fused AdamW (fp32 moments)

    def part(self, padded: int) -> int:
        return padded // self.group_size if self.shard else padded


class Zero1AdamW(torch.optim.Optimizer):
    """AdamW with ZeRO-1 sharding over explicit groups (see the module docstring).

    `params` are torch-style param groups (dicts with `params` and optional `lr`,
    `weight_decay`, `betas`, `eps`). `expert_params` are sharded over `edp_group`, `tied_params`
    are the embedding copies synchronised over `embed_group`; `norm_group` (None = world) sums
    the squared norms; `count_tied_in_norm` is True on the stage that owns the embedding;
    `norm_weight` scales this rank's squared norm (0.5 under DualPipe, where every piece has two
    replicas whose gradients were already summed).
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]] | Iterable[nn.Parameter],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        dp_group: dist.ProcessGroup | None = None,
        edp_group: dist.ProcessGroup | None = None,
        embed_group: dist.ProcessGroup | None = None,
        norm_group: dist.ProcessGroup | None = None,
        expert_params: Iterable[torch.Tensor] = (),
        tied_params: Iterable[torch.Tensor] = (),
        count_tied_in_norm: bool = True,
        norm_weight: float = 1.0,
        max_grad_norm: float = 0.0,
        moments_dtype: torch.dtype = torch.float32,
        bucket_numel: int = 1 << 22,
        shard: bool = True,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if moments_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"parallel.moments_dtype={moments_dtype}: use float32 or bfloat16")
        self.moments_dtype = moments_dtype
        self.max_grad_norm = max_grad_norm
        self.bucket_numel = max(1, int(bucket_numel))
        self.chunk_numel = 1 << 20  # elements per chunk of the bf16-moment update (bounded temporaries)
        self.shard = shard
        self.dp_group, self.edp_group, self.embed_group = dp_group, edp_group, embed_group
        self.norm_group = norm_group
        self.count_tied_in_norm = count_tied_in_norm
        self.norm_weight = norm_weight  # 1/replicas when every parameter here also lives on another rank
        self.step_count = 0
        self.last_grad_norm = float("nan")
        self._expected: dict[int, int] = {}
        self._marks: dict[int, int] = {}
        self._launched: set[tuple[int, int]] = set()
        self._reduced = False  # reduce_gradients() done for the coming step
        expert_ids = {id(p) for p in expert_params}
        tied_ids = {id(p) for p in tied_params}
        self.spaces: list[_Space] = []
        for gi, group in enumerate(self.param_groups):
            by_kind: dict[str, list[nn.Parameter]] = {"dense": [], "expert": [], "tied": []}
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                kind = "expert" if id(p) in expert_ids else "tied" if id(p) in tied_ids else "dense"
                by_kind[kind].append(p)
            for kind, plist in by_kind.items():
                if plist:
                    self.spaces.append(self._make_space(kind, gi, plist))

    # ------------------------------------------------------------------ layout
    def _make_space(self, kind: str, gi: int, plist: list[nn.Parameter]) -> _Space:
        group = self.edp_group if kind == "expert" else self.dp_group
        size = dist.get_world_size(group) if dist.is_initialized() else 1
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        sp = _Space(kind=kind, group_index=gi, group=group, group_size=size, group_rank=rank, shard=self.shard)
        cur: list[nn.Parameter] = []
        cur_n = 0

        def flush() -> None:
            nonlocal cur, cur_n
            if not cur:
                return
            offsets, o = [], 0
            for p in cur:
                offsets.append(o)
                o += p.numel()
            padded = math.ceil(o / size) * size
            shard_offset = sum(sp.part(b.padded) for b in sp.buckets)
            sp.buckets.append(_Bucket(params=cur, offsets=offsets, numel=o, padded=padded, shard_offset=shard_offset))
            cur, cur_n = [], 0

        for p in plist:
            if cur and cur_n + p.numel() > self.bucket_numel:
                flush()
            cur.append(p)
            cur_n += p.numel()
        flush()
        total = sum(sp.part(b.padded) for b in sp.buckets)
        device = plist[0].device
        sp.master = torch.zeros(total, dtype=torch.float32, device=device)
        sp.exp_avg = torch.zeros(total, dtype=self.moments_dtype, device=device)
        sp.exp_avg_sq = torch.zeros(total, dtype=self.moments_dtype, device=device)
        if self.moments_dtype == torch.float32:
            # the shard as the single parameter of a fused torch AdamW whose state is our moments
            master_param = nn.Parameter(sp.master, requires_grad=True)
            hp = self.param_groups[gi]
            inner = torch.optim.AdamW(
                [master_param], lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                fused=True,
            )
            inner.state[master_param] = {
                "step": torch.zeros((), dtype=torch.float32, device=device),
                "exp_avg": sp.exp_avg,
                "exp_avg_sq": sp.exp_avg_sq,
            }
            sp.fused = (inner, master_param)
        with torch.no_grad():
            for b in sp.buckets:
                flat = self._flatten(b, [p.detach() for p in b.params], torch.float32)
                sp.master[b.shard_offset : b.shard_offset + sp.part(b.padded)] = self._own(sp, b, flat)
        return sp

    @staticmethod
    def _flatten(
        b: _Bucket, tensors: Sequence[torch.Tensor | None], dtype: torch.dtype, *, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        flat_P = torch.empty(b.padded, dtype=dtype, device=b.params[0].device) if out is None else out
        flat_P[b.numel :].zero_()
        for t, o, p in zip(tensors, b.offsets, b.params):
            if t is not None:
                flat_P[o : o + p.numel()].copy_(t.reshape(-1))
            else:
                flat_P[o : o + p.numel()].zero_()
        return flat_P

    @staticmethod
    def _own(sp: _Space, b: _Bucket, flat_P: torch.Tensor) -> torch.Tensor:
        if not sp.shard:
            return flat_P
        n = b.padded // sp.group_size
        return flat_P[sp.group_rank * n : (sp.group_rank + 1) * n]

    # ------------------------------------------------------------------ accounting
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (master weights and both moments)."""
        return sum(t.numel() * t.element_size() for sp in self.spaces for t in (sp.master, sp.exp_avg, sp.exp_avg_sq))

    def unsharded_state_bytes(self) -> int:
        """What the same state would take without sharding (this rank's parameters, no padding)."""
        per = 4 + 2 * torch.empty((), dtype=self.moments_dtype).element_size()
        return sum(b.numel * per for sp in self.spaces for b in sp.buckets)

    # ------------------------------------------------------------------ step
    def expect_ready_marks(self, counts: dict[int, int]) -> None:
        """How many `mark_ready` calls make each parameter final (id(param) -> number of chunks)."""
        self._expected = dict(counts)

    @torch.no_grad()
    def mark_ready(self, params: Sequence[torch.Tensor]) -> None:
        """Gradients of `params` are final for this step: start every bucket whose params all are.

        Called by the pipeline stage after the last backward of a chunk, so the reduce-scatter of
        a finished chunk runs while the rank still computes its other chunks (DualPipeV, interleaved)
        or waits for the rest of the pipeline. Ranks of a group start buckets in the same order
        because they run the same schedule.
        """
        for p in params:
            self._marks[id(p)] = self._marks.get(id(p), 0) + 1
        for sp in self.spaces:
            for bi, b in enumerate(sp.buckets):
                if (id(sp), bi) in self._launched:
                    continue
                if all(self._marks.get(id(p), 0) >= self._expected.get(id(p), 1) for p in b.params):
                    self._launch(sp, bi)

    def _launch(self, sp: _Space, bi: int) -> None:
        if sp.grad is None:
            if sp.grad_buf is None:  # persistent: no fresh allocation (and page faults) every step
                sp.grad_buf = torch.empty_like(sp.master)
            sp.grad = sp.grad_buf
            sp.pending = []
        b = sp.buckets[bi]
        self._launched.add((id(sp), bi))
        out = sp.grad[b.shard_offset : b.shard_offset + sp.part(b.padded)]
        if sp.group_size == 1:  # nothing to reduce: flatten straight into the shard
            self._flatten(b, [p.grad for p in b.params], torch.float32, out=out)
            return
        flat_P = self._flatten(b, [p.grad for p in b.params], torch.float32)
        if sp.shard:
            sp.pending.append(dist.reduce_scatter_tensor(out, flat_P, group=sp.group, async_op=True))
        else:
            sp.pending.append((dist.all_reduce(flat_P, group=sp.group, async_op=True), out, flat_P))

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Reduce-scatter (or all-reduce) every bucket not started yet, wait for all of them."""
        for sp in self.spaces:
            for bi in range(len(sp.buckets)):
                if (id(sp), bi) not in self._launched:
                    self._launch(sp, bi)
        for sp in self.spaces:
            for w in sp.pending:
                if isinstance(w, tuple):
                    w[0].wait()
                    w[1].copy_(w[2])
                else:
                    w.wait()
            sp.pending = []
            if sp.kind == "tied" and self.embed_group is not None:
                dist.all_reduce(sp.grad, group=self.embed_group)
        self._marks.clear()
        self._launched.clear()
        self._reduced = True

    @torch.no_grad()
    def global_grad_norm(self) -> float:
        device = self.spaces[0].master.device if self.spaces and self.spaces[0].master is not None else "cpu"
        sq = torch.zeros((), dtype=torch.float64, device=device)  # on the device: nccl reduces device tensors
        for sp in self.spaces:
            assert sp.grad is not None, "reduce_gradients() must run before the norm"
            if sp.kind == "tied" and not self.count_tied_in_norm:
                continue
            if not sp.shard and sp.group_rank != 0:
                continue  # replicated: count one copy
            sq += torch.linalg.vector_norm(sp.grad).double() ** 2  # fp32 reduction, as clip_grad_norm_
        sq *= self.norm_weight
        if dist.is_initialized():
            dist.all_reduce(sq, group=self.norm_group)
        return float(sq.sqrt())

    @torch.no_grad()
    def step(self, closure: Any = None) -> float:  # type: ignore[override]
        """One optimizer step from the accumulated .grad; returns the (pre-clip) global grad norm."""
        assert closure is None, "closures are not supported"
        if not self._reduced:
            self.reduce_gradients()
        self._reduced = False
        norm = self.global_grad_norm()
        if not math.isfinite(norm):
            for sp in self.spaces:
                sp.grad = None
            raise FloatingPointError(
                f"non-finite gradient norm ({norm}); lower optim.lr, use precision=fp32, or check the data"
            )
        clip = 1.0
        if self.max_grad_norm > 0:
            clip = min(1.0, self.max_grad_norm / (norm + 1e-6))
        self.step_count += 1
        for sp in self.spaces:
            hp = self.param_groups[sp.group_index]
            self._adamw(sp, hp, clip=clip)
            sp.grad = None
        self._gather_params()
        self.last_grad_norm = norm
        return norm

    def _adamw(self, sp: _Space, hp: dict[str, Any], *, clip: float) -> None:
        assert sp.master is not None and sp.exp_avg is not None and sp.exp_avg_sq is not None and sp.grad is not None
        if clip != 1.0:
            sp.grad.mul_(clip)
        if sp.fused is not None:
            # FP32 moments: torch's fused AdamW kernel on the flat shard (one pass over memory)
            inner, master_param = sp.fused
            g = inner.param_groups[0]
            g["lr"], g["weight_decay"], g["eps"], g["betas"] = hp["lr"], hp["weight_decay"], hp["eps"], hp["betas"]
            master_param.grad = sp.grad
            inner.step()
            master_param.grad = None
            return
        # BF16 moments: the update of torch.optim.AdamW in FP32, chunk by chunk, moments stored back in BF16
        lr, wd, eps = float(hp["lr"]), float(hp["weight_decay"]), float(hp["eps"])
        beta1, beta2 = hp["betas"]
        bc1 = 1 - beta1**self.step_count
        bc2 = 1 - beta2**self.step_count
        n = sp.master.numel()
        for lo in range(0, n, self.chunk_numel):
            hi = min(n, lo + self.chunk_numel)
            w, g = sp.master[lo:hi], sp.grad[lo:hi]
            m, v = sp.exp_avg[lo:hi].float(), sp.exp_avg_sq[lo:hi].float()
            w.mul_(1 - lr * wd)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            w.addcdiv_(m, denom, value=-lr / bc1)
            sp.exp_avg[lo:hi].copy_(m)
            sp.exp_avg_sq[lo:hi].copy_(v)

    def _gather_params(self) -> None:
        jobs: list[tuple[_Bucket, torch.Tensor, Any]] = []
        for sp in self.spaces:
            assert sp.master is not None
            for b in sp.buckets:
                dtype = b.params[0].dtype
                mine = sp.master[b.shard_offset : b.shard_offset + sp.part(b.padded)].to(dtype)
                if sp.shard and sp.group_size > 1:
                    full_P = torch.empty(b.padded, dtype=dtype, device=mine.device)
                    work = dist.all_gather_into_tensor(full_P, mine, group=sp.group, async_op=True)
                    jobs.append((b, full_P, work))
                else:
                    jobs.append((b, mine, None))
        for b, full_P, work in jobs:
            if work is not None:
                work.wait()
            for p, o in zip(b.params, b.offsets):
                p.data.copy_(full_P[o : o + p.numel()].view_as(p))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """This rank's shards (each rank saves its own file) plus the hyper-parameters."""
        return {
            "step": self.step_count,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
            "spaces": [
                {
                    "kind": sp.kind, "group_index": sp.group_index, "group_size": sp.group_size,
                    "group_rank": sp.group_rank, "numel": sum(b.numel for b in sp.buckets),
                    "master": sp.master, "exp_avg": sp.exp_avg, "exp_avg_sq": sp.exp_avg_sq,
                }
                for sp in self.spaces
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        if len(state["spaces"]) != len(self.spaces):
            raise ValueError(
                f"optimizer checkpoint has {len(state['spaces'])} parameter spaces, this layout has "
                f"{len(self.spaces)}: resume with the same parallel layout"
            )
        for sp, saved in zip(self.spaces, state["spaces"]):
            if (saved["kind"], saved["group_size"], saved["group_rank"]) != (sp.kind, sp.group_size, sp.group_rank):
                raise ValueError(
                    f"optimizer checkpoint shard ({saved['kind']}, group {saved['group_rank']}/{saved['group_size']}) "
                    f"does not match this rank ({sp.kind}, {sp.group_rank}/{sp.group_size}): same layout needed"
                )
            assert sp.master is not None and sp.exp_avg is not None and sp.exp_avg_sq is not None
            sp.master.copy_(saved["master"])
            sp.exp_avg.copy_(saved["exp_avg"])
            sp.exp_avg_sq.copy_(saved["exp_avg_sq"])
        for g, saved in zip(self.param_groups, state["param_groups"]):
            g.update(saved)
        self.step_count = int(state["step"])
        for sp in self.spaces:
            if sp.fused is not None:
                inner, master_param = sp.fused
                inner.state[master_param]["step"].fill_(self.step_count)
        self._gather_params()
