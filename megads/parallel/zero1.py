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

Checkpoints are keyed by parameter name, not by bucket: `shard_views()` gives, for every
parameter this rank owns elements of, the element range [lo, hi) of the flattened parameter and
views of the FP32 master / moment slices of that range; megads.checkpoint writes them as slices
of one 1-D tensor per parameter and state, and a load fills the current layout's views from
whatever layout saved them, then `restore()` sets the step count and all-gathers the parameters.
So `parallel.bucket_numel`, `parallel.moments_dtype`, `parallel.zero1`, dp, ep and the pipeline
split may all change between a save and a resume (docs/checkpoints.md). The hyper-parameters
(lr, betas, eps, weight_decay) of the new launch stay in force; the saved ones are kept in
`loaded_hyperparameters` for the caller to report (`hyperparameter_changes()`).

Shapes: flat buffers are 1-D; `P` padded bucket length, `P/g` one rank's shard of it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megads.parallel.mesh import LocalGroup


# torch 2.13 names these two `reduce_scatter_single` / `all_gather_single` and warns on the old names
# on every call; torch 2.11 (the GPU machines') has only the old ones: the current name where it exists.
def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, *, group: Any, async_op: bool) -> Any:
    if hasattr(dist, "reduce_scatter_single"):
        return dist.reduce_scatter_single(out, inp, group=group, async_op=async_op)
    return dist.reduce_scatter_tensor(out, inp, group=group, async_op=async_op)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, *, group: Any, async_op: bool) -> Any:
    if hasattr(dist, "all_gather_single"):
        return dist.all_gather_single(out, inp, group=group, async_op=async_op)
    return dist.all_gather_into_tensor(out, inp, group=group, async_op=async_op)

_VEC = 16  # fp32 elements of one 64-byte cache line: the CPU fused AdamW kernel's vector and task unit
_HYPER = ("lr", "betas", "eps", "weight_decay")


def _size_rank(group: Any) -> tuple[int, int]:
    if isinstance(group, LocalGroup):
        return group.size, group.rank
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


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
    fused: _Fused | None = None  # inner fused AdamW (fp32 moments)

    def part(self, padded: int) -> int:
        return padded // self.group_size if self.shard else padded


@dataclass
class _Fused:
    """torch's fused AdamW over one space's flat shard (float32 moments).

    The CPU kernel works in tasks of 16 elements and vectors of 8 or 16, and updates the last
    `numel % vector` elements in a scalar loop whose rounding differs from the vector body's
    (other FMA contractions: measured, the moments differ in the last bit), so an element's
    update would depend on where the bucket layout puts it. `body` is the shard's first multiple
    of 16 elements, updated in place; the rest goes through the zero-padded 16-element `tail`
    parameter, so every element takes the vector path and a resume with another bucket size
    continues bit for bit.
    """

    inner: torch.optim.Optimizer
    body: nn.Parameter | None  # view of master[:n_body]; its state views exp_avg / exp_avg_sq
    tail: nn.Parameter | None  # _VEC elements: master[n_body:] copied in and out around a step
    n_body: int


@dataclass
class _Owned:
    """This rank's elements of one parameter: [lo, hi) of the flattened parameter, at `flat`."""

    space: _Space
    lo: int
    hi: int
    flat: int  # offset of element `lo` inside the space's flat shard
    numel: int  # the whole parameter


class Zero1AdamW(torch.optim.Optimizer):
    """AdamW with ZeRO-1 sharding over explicit groups (see the module docstring).

    `params` are torch-style param groups (dicts with `params` and optional `lr`,
    `weight_decay`, `betas`, `eps`). `expert_params` are sharded over `edp_group`, `tied_params`
    are the embedding copies synchronised over `embed_group`; `norm_group` (None = world) sums
    the squared norms; `count_tied_in_norm` is True on the stage that owns the embedding;
    `norm_weight` scales this rank's squared norm (0.5 under DualPipe, where every piece has two
    replicas whose gradients were already summed).

    Checkpoint names: a param group may carry `names`, a list parallel to its `params`
    (`megads.train.optim.param_groups_for` does), and `group`, its name (`decay`, `no_decay`);
    otherwise `param_names` (id(param) -> name) is used, and failing both the positional name
    `<group>.<index>` (`group0.3`: group name or `group<i>`, index in the group's `params`), which
    is stable only while the same parameters are passed in the same order.
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
        param_names: Mapping[int, str] | None = None,
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
        self.last_step_skipped = False
        self._expected: dict[int, int] = {}
        self._marks: dict[int, int] = {}
        self._launched: set[tuple[int, int]] = set()
        self._reduced = False  # reduce_gradients() done for the coming step
        self._rank = dist.get_rank() if dist.is_initialized() and not isinstance(dp_group, LocalGroup) else 0
        self.loaded_hyperparameters: dict[str, dict[str, Any]] | None = None  # set by restore()
        self._names = self._resolve_names(param_names or {})
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
        self._owned = self._owned_ranges()

    # ------------------------------------------------------------------ names
    def _group_name(self, gi: int) -> str:
        return str(self.param_groups[gi].get("group", f"group{gi}"))

    def _resolve_names(self, param_names: Mapping[int, str]) -> dict[int, str]:
        names: dict[int, str] = {}
        for gi, group in enumerate(self.param_groups):
            given = group.get("names")
            if given is not None and len(given) != len(group["params"]):
                raise ValueError(
                    f"param group {self._group_name(gi)!r}: {len(given)} names for {len(group['params'])} params; "
                    "`names` must be parallel to `params`"
                )
            for i, p in enumerate(group["params"]):
                names[id(p)] = str(given[i]) if given is not None else param_names.get(id(p), f"{self._group_name(gi)}.{i}")
        dupes = sorted(n for n, c in Counter(names.values()).items() if c > 1)
        if dupes:
            raise ValueError(f"parameter names {dupes[:5]} occur more than once: every parameter needs its own name")
        return names

    def _owned_ranges(self) -> dict[str, _Owned]:
        """Every parameter's element range owned by this rank (possibly empty), by name."""
        owned: dict[str, _Owned] = {}
        for sp in self.spaces:
            for b in sp.buckets:
                part = sp.part(b.padded)
                start = sp.group_rank * part if sp.shard else 0  # this rank's range inside the padded bucket
                for p, o in zip(b.params, b.offsets):
                    a, e = max(o, start), min(o + p.numel(), start + part)
                    lo, hi = (a - o, e - o) if a < e else (0, 0)
                    flat = b.shard_offset + (a - start if a < e else 0)
                    owned[self._names[id(p)]] = _Owned(space=sp, lo=lo, hi=hi, flat=flat, numel=p.numel())
        return owned

    # ------------------------------------------------------------------ layout
    def _make_space(self, kind: str, gi: int, plist: list[nn.Parameter]) -> _Space:
        group = self.edp_group if kind == "expert" else self.dp_group
        size, rank = _size_rank(group)
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
            # the shard as the parameters of a fused torch AdamW whose state is our moments (see _Fused)
            n_body = total - total % _VEC
            body = tail = None
            state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
            if n_body:
                body = nn.Parameter(sp.master[:n_body], requires_grad=True)  # shares the master's storage
                state[body] = {"exp_avg": sp.exp_avg[:n_body], "exp_avg_sq": sp.exp_avg_sq[:n_body]}
            if total > n_body:
                tail = nn.Parameter(torch.zeros(_VEC, dtype=torch.float32, device=device), requires_grad=True)
                state[tail] = {"exp_avg": torch.zeros_like(tail.data), "exp_avg_sq": torch.zeros_like(tail.data)}
            hp = self.param_groups[gi]
            inner = torch.optim.AdamW(
                list(state), lr=hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"],
                fused=True,
            )
            for q, st in state.items():
                inner.state[q] = {"step": torch.zeros((), dtype=torch.float32, device=device), **st}
            sp.fused = _Fused(inner=inner, body=body, tail=tail, n_body=n_body)
        self._copy_params_to_master(sp)
        return sp

    @torch.no_grad()
    def _copy_params_to_master(self, sp: _Space) -> None:
        assert sp.master is not None
        for b in sp.buckets:
            flat = self._flatten(b, [p.detach() for p in b.params], torch.float32)
            sp.master[b.shard_offset : b.shard_offset + sp.part(b.padded)] = self._own(sp, b, flat)

    def reset_from_params(self) -> None:
        """Master weights from the parameters' current values, moments and step count zero: a
        fresh optimizer for weights loaded after construction (`checkpoint.init_from`)."""
        self.step_count = 0
        for sp in self.spaces:
            self._copy_params_to_master(sp)
            assert sp.exp_avg is not None and sp.exp_avg_sq is not None
            sp.exp_avg.zero_()
            sp.exp_avg_sq.zero_()
            if sp.fused is not None:
                for st in sp.fused.inner.state.values():
                    st["step"].zero_()

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
            sp.pending.append(_reduce_scatter(out, flat_P, group=sp.group, async_op=True))
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
        sq = torch.zeros((), dtype=torch.float64, device=self._device())  # on the device: nccl reduces device tensors
        for sp in self.spaces:
            assert sp.grad is not None, "reduce_gradients() must run before the norm"
            if sp.kind == "tied" and not self.count_tied_in_norm:
                continue
            if not sp.shard and sp.group_rank != 0:
                continue  # replicated: count one copy
            # accumulated in float64: an fp32 reduction over a 1M-element shard is off by ~1e-5, and
            # by a different amount for every bucket layout (a resume with another bucket_numel
            # would then clip differently and drift)
            sq += torch.linalg.vector_norm(sp.grad, dtype=torch.float64) ** 2
        sq *= self.norm_weight
        if dist.is_initialized():
            dist.all_reduce(sq, group=self.norm_group)
        return float(sq.sqrt())

    @torch.no_grad()
    def step(self, closure: Any = None, *, skip: bool = False) -> float:  # type: ignore[override]
        """One optimizer step from the accumulated .grad; returns the (pre-clip) global grad norm.

        The step is skipped -- no parameter, moment or step-count change, the gradients dropped --
        when the global norm is not finite or `skip` is set (the caller saw a non-finite loss);
        `last_step_skipped` says so. The norm is a world all-reduce and `skip` must be given alike
        on every rank, so every rank skips the same steps.
        """
        assert closure is None, "closures are not supported"
        if not self._reduced:
            self.reduce_gradients()
        self._reduced = False
        norm = self.global_grad_norm()
        self.last_step_skipped = skip or not math.isfinite(norm)
        if self.last_step_skipped:
            for sp in self.spaces:
                sp.grad = None
            self.last_grad_norm = norm
            return norm
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
            f = sp.fused
            g = f.inner.param_groups[0]
            g["lr"], g["weight_decay"], g["eps"], g["betas"] = hp["lr"], hp["weight_decay"], hp["eps"], hp["betas"]
            n = f.n_body
            if f.body is not None:
                f.body.grad = sp.grad[:n]
            if f.tail is not None:  # the last < 16 elements, zero-padded to one vector
                r = sp.master.numel() - n
                st = f.inner.state[f.tail]
                f.tail.data[:r].copy_(sp.master[n:])
                st["exp_avg"][:r].copy_(sp.exp_avg[n:])
                st["exp_avg_sq"][:r].copy_(sp.exp_avg_sq[n:])
                f.tail.grad = torch.zeros_like(f.tail.data)
                f.tail.grad[:r].copy_(sp.grad[n:])
            f.inner.step()
            if f.tail is not None:
                st = f.inner.state[f.tail]
                sp.master[n:].copy_(f.tail.data[:r])
                sp.exp_avg[n:].copy_(st["exp_avg"][:r])
                sp.exp_avg_sq[n:].copy_(st["exp_avg_sq"][:r])
                f.tail.grad = None
            if f.body is not None:
                f.body.grad = None
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
                    work = _all_gather(full_P, mine, group=sp.group, async_op=True)
                    jobs.append((b, full_P, work))
                else:
                    jobs.append((b, mine, None))
        for b, full_P, work in jobs:
            if work is not None:
                work.wait()
            for p, o in zip(b.params, b.offsets):
                p.data.copy_(full_P[o : o + p.numel()].view_as(p))

    # ------------------------------------------------------------------ checkpoint
    def hyperparameters(self) -> dict[str, dict[str, Any]]:
        """lr, betas, eps and weight_decay of every param group, by group name (`decay`, `group0`)."""
        return {self._group_name(gi): {k: _plain(g[k]) for k in _HYPER} for gi, g in enumerate(self.param_groups)}

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Not torch's per-rank state: checkpoints store ZeRO-1 state by global parameter name
        through `shard_views()` (megads.checkpoint.state.optimizer_entries), so that it reshards."""
        raise NotImplementedError(
            "Zero1AdamW state is saved by parameter name with megads.checkpoint (optimizer_entries / "
            "training_entries), not with optimizer.state_dict()"
        )

    def load_state_dict(self, state_dict: Any) -> None:  # type: ignore[override]
        raise NotImplementedError(
            "load Zero1AdamW state with megads.checkpoint.state.load_training_state (fills shard_views(), "
            "then restore())"
        )

    def shard_views(self) -> dict[str, tuple[int, int, int, str, dict[str, torch.Tensor]]]:
        """name -> (lo, hi, numel, kind, {"master", "exp_avg", "exp_avg_sq": views of this rank's
        elements [lo, hi) of the flattened parameter}) for every parameter it owns elements of.

        The views are the optimizer's own storage: a checkpoint writes from them and a load fills
        them in place (then `restore` the step count); nothing depends on the bucket layout.
        """
        out: dict[str, tuple[int, int, int, str, dict[str, torch.Tensor]]] = {}
        for name, own in self._owned.items():
            if own.hi == own.lo:
                continue
            sp = own.space
            sl = slice(own.flat, own.flat + own.hi - own.lo)
            views = {key: getattr(sp, key)[sl] for key in ("master", "exp_avg", "exp_avg_sq")}
            out[name] = (own.lo, own.hi, own.numel, sp.kind, views)
        return out

    def restore(self, *, step: int, hyperparameters: dict[str, dict[str, Any]]) -> None:
        """After `shard_views()` were filled from a checkpoint: the step count, the saved
        hyper-parameters (kept for `hyperparameter_changes`), and the parameters from the master
        weights (an all-gather over each space's group)."""
        self.step_count = step
        for sp in self.spaces:
            if sp.fused is not None:
                for st in sp.fused.inner.state.values():
                    st["step"].fill_(step)
        self.loaded_hyperparameters = {g: dict(hp) for g, hp in hyperparameters.items()}
        self._gather_params()

    def hyperparameter_changes(
        self, keys: Sequence[str] = ("betas", "eps", "weight_decay")
    ) -> dict[str, tuple[Any, Any]]:
        """{"<group>.<key>": (saved, current)} for every hyper-parameter the resume changes.

        `lr` is left out by default: the executor sets it from the schedule on every step, so
        the saved (last scheduled) and current (configured base) values always differ.
        """
        if self.loaded_hyperparameters is None:
            return {}
        saved, now = self.loaded_hyperparameters, self.hyperparameters()
        out: dict[str, tuple[Any, Any]] = {}
        for group in sorted(set(saved) | set(now)):
            for k in keys:
                a, b = saved.get(group, {}).get(k), now.get(group, {}).get(k)
                if a != b:
                    out[f"{group}.{k}"] = (a, b)
        return out

    def _device(self) -> torch.device:
        return self.spaces[0].master.device if self.spaces and self.spaces[0].master is not None else torch.device("cpu")

def _plain(v: Any) -> Any:
    """A hyper-parameter as plain floats (betas a tuple), comparable and saved without tensors."""
    if isinstance(v, (tuple, list)):
        return tuple(float(x) for x in v)
    return float(v)
