"""DeepSeek stage whose F&B action overlaps the expert all-to-alls with the other chunk's compute.

`DeepseekOverlapStage` subclasses `DeepseekStage` (same pieces, same loss, same gradient scaling)
and changes how a chunk's autograd graph is kept: the forward is cut into *segments* at the
expert-parallel communication points of every MoE block,

    segment        attention + ffn_input + route                       (then dispatch all-to-all)
    segment        local experts on the received rows + shared experts (then combine all-to-all)
    segment        unpermute + gate-weighted sum + residual, and the next block's attention ...

Dense blocks, the embedding, the output head, CE and MTP sit inside the segments. At a boundary
every value a later segment needs is *cut*: detached and marked `requires_grad` (a leaf of the
next segment); a value sent through an all-to-all is detached, sent with the EP dispatcher's
asynchronous handles (`AllToAllDispatcher.dispatch_start` / `combine_start`), and the received
rows become a leaf. The backward walks the segments in reverse: `autograd.grad` of one segment's
outputs gives the gradients of its leaves, which are the output gradients of the previous
segment; across a communication edge the gradient goes through the reverse all-to-all, issued
asynchronously (`expert_parallel.all_to_all_rows`) with the permutations of the dispatcher
applied by hand (they are exact: a permutation's gradient is the inverse permutation, and the
token-to-row gather's gradient is `index_add`).

Forward and backward are generators that yield each in-flight all-to-all, so

    forward_backward_overlapped(f, b) = pipeline.overlap.interleave(backward_steps(b), forward_steps(f))

runs: B combine-tail/head backward, issue combine-backward a2a | F attention, issue dispatch |
B experts backward, issue dispatch-backward a2a | F experts, issue combine | ... -- every
all-to-all of one chunk is in flight while the other chunk computes. Plain F, B, W and BW
actions drive the same generators to completion one handle at a time, so every schedule runs
on the same segmented graph. The B/W split is exact and cheap: B walks the segments for the
leaf gradients only (with the a2a backward), keeping each segment's (outputs, output gradients);
W runs `autograd.grad(outputs, parameters)` per segment and does no communication.

The forward values are bit-identical to `DeepseekStage` (same operations in the same order);
gradients differ only by float summation order where a value has several consumers.
With ep = 1 (local dispatcher, no communication) a MoE block is not cut.

`OverlapParallelExecutor` is `ParallelExecutor` with this stage (it converts the stage the parent
builds, so it follows the parent's constructor).

Shapes: B micro-batch sequences, T sequence, D hidden, N = B*T tokens, K top-k, S = N*K rows
sent, M rows received by this rank's experts.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from megads.model.block import RopeCache, TransformerBlock
from megads.model.moe import MoE
from megads.model.transformer import cross_entropy
from megads.parallel.executor import ParallelExecutor
from megads.parallel.expert_parallel import AllToAllDispatcher, all_to_all_rows
from megads.parallel.stages import DeepseekStage
from pipeline.overlap import Waitable, interleave
from pipeline.runtime import PipelineRuntime
from pipeline.stage import BackwardArgs, ForwardArgs

Steps = Generator[Waitable, None, Any]


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def drive(steps: Steps) -> Any:
    """Run one step generator to completion, waiting on each handle at once (no overlap)."""
    return interleave(steps)[0]


# ------------------------------------------------------------------------------------------------
# communication edges: the reverse all-to-all of a segment boundary, asynchronous


class _GradHandle:
    """An asynchronous reverse all-to-all; `finish()` after `wait()` gives the sent value's gradient."""

    def __init__(self, pending: Any, finish: Any) -> None:
        self.pending = pending
        self._finish = finish

    def wait(self) -> None:
        self.pending.wait()

    def finish(self) -> torch.Tensor:
        self.pending.wait()
        return self._finish()


@dataclass
class _DispatchEdge:
    """f_ND -(sort, a2a, permute)-> x_MD; backward: inverse permute, reverse a2a, index_add.

    `state` is the dispatcher's record of the exchange (`DispatchHandle.state`).
    """

    group: Any
    state: dict[str, Any]
    shape_ND: tuple[int, int]

    def backward_start(self, grad_x_MD: torch.Tensor) -> _GradHandle:
        st = self.state
        grad_rows_MD = grad_x_MD.index_select(0, _inverse(st["perm_M"])).contiguous()
        grad_SD, pending = all_to_all_rows(
            grad_rows_MD, out_splits=st["in_splits"], in_splits=st["out_splits"], group=self.group
        )
        K = st["K"]

        def finish() -> torch.Tensor:
            token_S = _inverse(st["unsort_S"]) // K  # sorted row -> token
            return grad_SD.new_zeros(self.shape_ND).index_add_(0, token_S, grad_SD)

        return _GradHandle(pending, finish)


@dataclass
class _CombineEdge:
    """y_MD -(inverse permute, a2a, unsort)-> y_NKD; backward: sort, reverse a2a, permute."""

    group: Any
    state: dict[str, Any]

    def backward_start(self, grad_y_NKD: torch.Tensor) -> _GradHandle:
        st = self.state
        grad_y_SD = grad_y_NKD.reshape(-1, grad_y_NKD.shape[-1])
        grad_rows_SD = grad_y_SD.index_select(0, _inverse(st["unsort_S"])).contiguous()
        grad_MD, pending = all_to_all_rows(
            grad_rows_SD, out_splits=st["out_splits"], in_splits=st["in_splits"], group=self.group
        )
        return _GradHandle(pending, lambda: grad_MD.index_select(0, st["perm_M"]))


Edge = _DispatchEdge | _CombineEdge


# ------------------------------------------------------------------------------------------------
# the segmented graph of one (chunk, micro-batch)


@dataclass
class _Segment:
    inputs: list[torch.Tensor]  # leaves: cut carries, then the received rows (if an edge precedes)
    outs: list[torch.Tensor] = field(default_factory=list)  # cut carries, then the sent value
    n_plain: int = 0  # how many of `outs` are plain cuts (the rest: the sent value of `edge`)
    edge: Edge | None = None  # communication to the next segment


@dataclass
class _Tape:
    """Segments of one chunk's forward, closed at each boundary."""

    segments: list[_Segment]
    current: _Segment

    @classmethod
    def start(cls, inputs: list[torch.Tensor]) -> _Tape:
        return cls(segments=[], current=_Segment(inputs=list(inputs)))

    def boundary(
        self, carry: dict[str, Any], *, send: torch.Tensor | None = None, edge: Edge | None = None
    ) -> dict[str, Any]:
        """Close the current segment; every carried tensor with grad becomes a leaf of the next."""
        seg = self.current
        nxt: list[torch.Tensor] = []
        out: dict[str, Any] = {}
        for key, t in carry.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                leaf = t.detach().requires_grad_(True)
                seg.outs.append(t)
                nxt.append(leaf)
                out[key] = leaf
            else:
                out[key] = t
        seg.n_plain = len(seg.outs)
        if edge is not None:
            assert send is not None
            seg.outs.append(send)
            seg.edge = edge
        self.segments.append(seg)
        self.current = _Segment(inputs=nxt)
        return out

    def receive(self, t: torch.Tensor) -> torch.Tensor:
        """The rows that arrived over the edge that closed the previous segment, as a leaf."""
        leaf = t.detach().requires_grad_(True)
        self.current.inputs.append(leaf)
        return leaf

    def finish(self, outs: list[torch.Tensor]) -> None:
        self.current.outs = list(outs)
        self.current.n_plain = len(outs)
        self.segments.append(self.current)


# ------------------------------------------------------------------------------------------------


class DeepseekOverlapStage(DeepseekStage):
    """`DeepseekStage` with a segmented graph and an overlapped F&B (see the module docstring)."""

    @classmethod
    def from_stage(cls, stage: DeepseekStage) -> DeepseekOverlapStage:
        """The same stage (same model, layout, hooks and scaling) with the overlapped F&B."""
        new = cls.__new__(cls)
        new.__dict__.update(stage.__dict__)
        new._init_overlap()
        return new

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_overlap()

    def _init_overlap(self) -> None:
        self._tapes: dict[tuple[int, int], tuple[_Tape, torch.Tensor | None]] = {}
        # B/W split: per segment (outputs, output gradients) that W still has to walk
        self._w_pending: dict[tuple[int, int], list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}

    def end_step(self) -> None:
        assert not self._tapes and not self._w_pending, (list(self._tapes), list(self._w_pending))
        super().end_step()

    def _amp(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------------ protocol
    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor:
        return drive(self.forward_steps(chunk, mb, x))

    def backward_full(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        return drive(self.backward_steps(chunk, mb, grad_y, weights=True))

    def backward_input(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        return drive(self.backward_steps(chunk, mb, grad_y, weights=False))

    def backward_weight(self, chunk: int, mb: int) -> None:
        params = self.chunk_parameters(chunk)
        acc: list[torch.Tensor | None] = [None] * len(params)
        for outs, grads in reversed(self._w_pending.pop((chunk, mb))):
            got = torch.autograd.grad(outs, params, grads, allow_unused=True)
            _add_into(acc, got)
        self._accumulate(chunk, params, acc)

    def forward_backward_overlapped(
        self, f: ForwardArgs, b: BackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward of (f.chunk, f.mb) and full backward of (b.chunk, b.mb), interleaved at the a2as."""
        grad_x, y = interleave(
            self.backward_steps(b.chunk, b.mb, b.grad_y, weights=True), self.forward_steps(f.chunk, f.mb, f.x)
        )
        return y, grad_x

    # ------------------------------------------------------------------ forward
    def forward_steps(self, chunk: int, mb: int, x: torch.Tensor | None) -> Steps:
        """The chunk's forward as a generator yielding each in-flight all-to-all; returns y."""
        assert self._microbatches is not None
        spec = self.specs[self.layout.chunks[chunk].piece]
        m = self.model
        ids_BT, labels_BT = self._microbatches[mb]
        ids_BT, labels_BT = ids_BT.to(self.device), labels_BT.to(self.device)
        inp: torch.Tensor | None = None
        with self._amp():
            rope = m.rope(ids_BT.shape[1], device=self.device, dtype=self.dtype)
            if spec.first:
                h_BTD = m.embed(ids_BT)
            else:
                assert x is not None
                inp = x.requires_grad_(True)
                h_BTD = inp
            balance = h_BTD.new_zeros((), dtype=torch.float32)
        tape = _Tape.start([inp] if inp is not None else [])
        carry: dict[str, Any] = {"h": h_BTD, "bal": balance}
        for i in spec.layers:
            carry = yield from self._block_steps(tape, m.layers[str(i)], carry, rope=rope, h_key="h", bal_key="bal")
        if not spec.last:
            h_BTD, balance = carry["h"], carry["bal"]
            self.stats[2] += float(balance.detach())
            h_BTD = h_BTD.to(self.dtype)  # the next stage's receive buffers have the parameters' dtype
            outs = [h_BTD] + ([balance] if balance.requires_grad else [])
            tape.finish(outs)
            self._tapes[(chunk, mb)] = (tape, inp)
            return h_BTD
        # last piece: head and CE, then the MTP depths (their blocks are cut like the main ones)
        with self._amp():
            carry["lm"] = cross_entropy(m.head(carry["h"]), labels_BT)
        use_mtp = self.mtp_weight > 0 and bool(m.mtp)
        depths = 0  # MTP depths run (depth k's loss is carried as carry[f"mtp{k}"])
        if use_mtp:
            assert m.mtp is not None and m.embed_tokens is not None and m.lm_head is not None
            T = ids_BT.shape[1]
            carry["mbal"] = carry["h"].new_zeros((), dtype=torch.float32)
            for k, module in enumerate(m.mtp.values(), start=1):
                if T - k <= 0:
                    break
                with self._amp():
                    emb_BTD = m.embed_tokens(ids_BT[:, k:])
                    rope_k = (rope[0][: T - k], rope[1][: T - k])
                    h_prev = carry["h"][:, : T - k]
                    carry["h"] = module.eh_proj(torch.cat([module.enorm(emb_BTD), module.hnorm(h_prev)], dim=-1))
                carry = yield from self._block_steps(
                    tape, module.block, carry, rope=rope_k, h_key="h", bal_key="mbal"
                )
                with self._amp():
                    logits = m.lm_head(module.norm(carry["h"]))
                    carry[f"mtp{k}"] = cross_entropy(logits, labels_BT[:, k:])
                depths = k
        with self._amp():
            lm, balance = carry["lm"], carry["bal"]
            total = lm
            mtp = lm.new_zeros(())
            if use_mtp:
                balance = balance + carry["mbal"]
                if depths:  # mtp_loss: mean over depths of the depth-k cross entropies
                    mtp = torch.stack([carry[f"mtp{k}"] for k in range(1, depths + 1)]).mean()
                    total = total + self.mtp_weight * mtp
                else:
                    mtp = labels_BT.new_zeros((), dtype=torch.float32)
            total = total + balance
        self.stats += torch.stack([lm.detach(), mtp.detach(), balance.detach()]).double().cpu()
        tape.finish([total])
        self._tapes[(chunk, mb)] = (tape, inp)
        return total

    def _block_steps(
        self,
        tape: _Tape,
        block: nn.Module,
        carry: dict[str, Any],
        *,
        rope: RopeCache,
        h_key: str,
        bal_key: str,
    ) -> Generator[Waitable, None, dict[str, Any]]:
        """One transformer block: attention -> dispatch -> experts -> combine, cut at both a2as."""
        assert isinstance(block, TransformerBlock)
        moe = block.mlp
        if not (block.is_moe and isinstance(moe, MoE) and isinstance(moe.dispatcher, AllToAllDispatcher)):
            with self._amp():
                out_BTD, b = block(carry[h_key], rope)
                carry = dict(carry)
                carry[h_key] = out_BTD
                carry[bal_key] = carry[bal_key] + b
            return carry
        disp = moe.dispatcher
        # attention, router, shared experts; the dispatch all-to-all is issued at the end
        with self._amp():
            h_BTD = block.attention_step(carry[h_key], rope)
            f_BTD = block.ffn_input(h_BTD)
            routing = moe.route(f_BTD)
            f_ND = f_BTD.reshape(-1, f_BTD.shape[-1])
            carry = dict(carry)
            carry[h_key] = h_BTD
            carry[bal_key] = carry[bal_key] + routing.balance_loss
            carry["_w"] = routing.topk_weight_NK
            carry["_f"] = f_BTD
        dh = disp.dispatch_start(f_ND.detach(), routing.topk_idx_NK)
        carry = tape.boundary(carry, send=f_ND, edge=_DispatchEdge(disp.group, dh.state, (f_ND.shape[0], f_ND.shape[1])))
        yield dh.pending
        res = dh.wait()
        # local experts on the received rows; the combine all-to-all is issued at the end
        x_MD = tape.receive(res.x_MD)
        with self._amp():
            y_MD = moe.experts(x_MD, res.counts)
            f_BTD = carry.pop("_f")
            # the shared experts run here, so this segment's compute (which hides the other
            # chunk's all-to-all) is not only the routed experts' small grouped GEMMs
            carry["_shared"] = moe.shared_experts(f_BTD) if moe.shared_experts is not None else None
        ch = disp.combine_start(y_MD.detach(), res)
        carry = tape.boundary(carry, send=y_MD, edge=_CombineEdge(disp.group, res.state))
        yield ch.pending
        # unpermute, gate-weighted sum, shared experts, residual (MoE.combine + block residual)
        y_NKD = tape.receive(ch.wait())
        with self._amp():
            weight_NK1 = carry.pop("_w").to(y_NKD.dtype).unsqueeze(-1)
            routed_ND = (y_NKD * weight_NK1).sum(dim=1)
            out_BTD = routed_ND.view(carry[h_key].shape)
            shared = carry.pop("_shared")
            if shared is not None:
                out_BTD = out_BTD + shared
            carry[h_key] = carry[h_key] + out_BTD
        return carry

    # ------------------------------------------------------------------ backward
    def backward_steps(self, chunk: int, mb: int, grad_y: torch.Tensor, *, weights: bool) -> Steps:
        """Backward of the chunk, segment by segment in reverse, yielding each reverse all-to-all.

        weights=True: input and parameter gradients (BW); False: input gradient only (B), the
        per-segment (outputs, gradients) kept for `backward_weight`.
        """
        tape, inp = self._tapes.pop((chunk, mb))
        segs = tape.segments
        params = self.chunk_parameters(chunk) if weights else []
        acc: list[torch.Tensor | None] = [None] * len(params)
        keep: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        last = segs[-1]
        grad_outs: list[torch.Tensor | None] = list(self._output_grads(chunk, last.outs, grad_y))
        grad_in: list[torch.Tensor | None] = []
        for k in range(len(segs) - 1, -1, -1):
            seg = segs[k]
            if k < len(segs) - 1:
                grad_outs = list(grad_in[: seg.n_plain])
                if seg.edge is not None:
                    recv_leaf = segs[k + 1].inputs[seg.n_plain]
                    g = grad_in[seg.n_plain]
                    g = torch.zeros_like(recv_leaf) if g is None else g  # every ep rank must send
                    with torch.no_grad():
                        handle = seg.edge.backward_start(g)
                    yield handle
                    with torch.no_grad():
                        grad_outs.append(handle.finish())
            pairs = [(o, g) for o, g in zip(seg.outs, grad_outs) if g is not None]
            outs = [o for o, _ in pairs]
            gouts = [g for _, g in pairs]
            n_in = len(seg.inputs)
            if outs and n_in + len(params):
                got = torch.autograd.grad(
                    outs, seg.inputs + params, gouts, allow_unused=True, retain_graph=not weights
                )
                grad_in = list(got[:n_in])
                _add_into(acc, got[n_in:])
                if not weights:
                    keep.append((outs, gouts))
            else:
                grad_in = [None] * n_in
                if outs and not weights:
                    keep.append((outs, gouts))
        if weights:
            self._accumulate(chunk, params, acc)
        else:
            self._w_pending[(chunk, mb)] = keep
        if inp is None:
            return None
        assert segs[0].inputs and segs[0].inputs[0] is inp
        return grad_in[0] if grad_in[0] is not None else torch.zeros_like(inp)


def _add_into(acc: list[torch.Tensor | None], got: tuple[torch.Tensor | None, ...]) -> None:
    for i, g in enumerate(got):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g


class OverlapParallelExecutor(ParallelExecutor):
    """`ParallelExecutor` whose pipeline stage is `DeepseekOverlapStage` (overlapped F&B)."""

    stage_cls: type[DeepseekOverlapStage] = DeepseekOverlapStage

    def _runtime(self, num_microbatches: int, *, mtp_weight: float) -> tuple[PipelineRuntime, DeepseekStage]:
        rt, stage = super()._runtime(num_microbatches, mtp_weight=mtp_weight)
        if not isinstance(stage, self.stage_cls):
            stage = self.stage_cls.from_stage(stage)
            rt.stage = stage
            self._runtimes[num_microbatches] = (rt, stage)
        return rt, stage
