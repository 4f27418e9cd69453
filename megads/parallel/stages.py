"""The DeepSeek-V3 pipeline stage: model pieces on ranks, their forward and backward pieces.

The model's L transformer layers are cut into `layout.num_pieces` consecutive pieces (layer
counts from `plan_layout`). Piece 0 also holds the embedding, the last piece the final norm,
the output head and the MTP modules. MTP needs the embedding too, so the rank of the last piece
keeps a copy of `embed_tokens`; ZeRO-1 keeps the two copies equal by summing their gradients
over the mesh's embed group (Megatron's tied-embedding rule). When both ends live on one rank
(pp = 1, or DualPipeV's V placement) there is a single embedding and nothing to sync.

`build_stage_model` builds the model on the meta device, deletes what the rank does not hold,
cuts the routed experts to its expert shard and only then allocates and initialises what is
left, every tensor from a generator seeded by (seed, name[, expert]) (megads.model.init), so
every layout starts from the weights a single process would have; `layers` stays a string-keyed
ModuleDict so parameter names match the single-process model.

`DeepseekStage` implements `pipeline.stage.PipelineStage` for one rank, with one forward written
once as a generator (`forward_steps`) that yields each in-flight all-to-all:

    forward(chunk, mb, x): first piece embeds micro-batch mb's tokens, every piece runs its
        layers (summing their sequence-wise balance losses; a MoE block runs the MoE's own
        steps), the last piece adds the head, the MTP depths (the model's `mtp_input` /
        `mtp_head`) and returns the micro-batch loss `total_loss` (CE + lambda * MTP + balance)

`overlap=True` cuts the graph at every expert all-to-all (megads.parallel.overlap_stage: the
tape, its segments, the backward walk) and makes F&B interleave a forward and a backward chunk;
with overlap off, or with the local dispatcher (ep = 1), a chunk is one segment and nothing is
yielded. Plain F/B/W/BW actions drive the same generators one handle at a time.
    backward(chunk, mb, grad_y): one autograd call over [y, balance] with gradients
        [grad_y * s, s/M] where s = 1/dp (the runtime already divides the loss gradient by the
        M micro-batches; the dp factor makes a SUM over data-parallel ranks the mean) and the
        balance loss of a non-last piece enters with the loss scale of its micro-batch.

B/W split (for zero-bubble schedules) follows `pipeline.module_stage`: B takes the input
gradient with the graph retained, W the parameter gradients (it re-walks the graph, including
the expert all-to-all backward, which every ep rank of the stage does in the same order).
1F1B uses the one-call full backward.

Shapes: B micro-batch sequences, T sequence, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megads.model.block import RopeCache, TransformerBlock
from megads.model.config import ModelConfig
from megads.model.dispatch import DispatchResult
from megads.model.linear import LinearFactory, WeightGradStash, deferrable_layers, deferring
from megads.model.loss import head_cross_entropy
from megads.model.moe import MoE
from megads.model.rope import RotaryEmbedding
from megads.model.router import Router
from megads.model.transformer import DeepseekV3, draw_init_seed, total_loss
from megads.parallel.context_parallel import ContextParallel, label_count
from megads.parallel.expert_parallel import AllToAllDispatcher, keep_expert_shard
from megads.parallel.overlap_stage import Reverse, Steps, Tape, drive
from megads.pipeline.actions import Layout
from megads.pipeline.overlap import Waitable, interleave
from megads.pipeline.stage import BackwardArgs, ForwardArgs, StageBase, TensorMeta


@dataclass(frozen=True)
class PieceSpec:
    """What one pipeline piece holds."""

    piece: int
    layers: tuple[int, ...]
    first: bool  # embedding
    last: bool  # norm, head, MTP


def piece_specs(stage_layers: Sequence[int]) -> list[PieceSpec]:
    specs, start = [], 0
    n = len(stage_layers)
    for p, count in enumerate(stage_layers):
        specs.append(PieceSpec(p, tuple(range(start, start + count)), first=p == 0, last=p == n - 1))
        start += count
    return specs


def rank_pieces(layout: Layout, *, rank: int) -> list[int]:
    return sorted({layout.chunks[c].piece for c in layout.chunks_on(rank)})


def embedding_ranks(layout: Layout) -> tuple[int, int]:
    """(pipeline rank of the first piece, of the last piece)."""
    first = next(info.rank for info in layout.chunks if info.piece == 0)
    last = next(info.rank for info in layout.chunks if info.piece == layout.num_pieces - 1)
    return first, last


def build_stage_model(
    cfg: ModelConfig,
    *,
    specs: Sequence[PieceSpec],
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    ep_size: int = 1,
    ep_rank: int = 0,
    init: bool = True,
    factory: LinearFactory | None = None,
) -> DeepseekV3:
    """This rank's share of the model, built on the meta device and materialised on `device`.

    Only the pieces `specs` (this rank's layers; embedding, head and MTP where they live) and
    expert shard `ep_rank` of `ep_size` are ever allocated. `init` draws every tensor from its
    own generator (`megads.model.init`), so the values equal those of the single-process
    `torch.manual_seed(seed); DeepseekV3(cfg)` for the same names and experts; `init=False`
    leaves the memory uninitialised (a checkpoint load or a memory measurement follows).
    """
    init_seed = draw_init_seed(torch.Generator().manual_seed(seed))  # what DeepseekV3 draws after manual_seed
    with torch.device("meta"):
        model = DeepseekV3(cfg, factory=factory, init_seed=init_seed)
    keep = {str(i) for s in specs for i in s.layers}
    for name in list(model.layers.keys()):
        if name not in keep:
            del model.layers[name]
    holds_first = any(s.first for s in specs)
    holds_last = any(s.last for s in specs)
    needs_embed = holds_first or (holds_last and cfg.num_nextn_predict_layers > 0)
    if not needs_embed:
        model.embed_tokens = None
    if not holds_last:
        model.norm = None
        model.lm_head = None
        model.mtp = None
    keep_expert_shard(model, ep_size=ep_size, ep_rank=ep_rank)
    model.to(dtype)
    model.to_empty(device=device)
    model.rotary = RotaryEmbedding(cfg).to(device)  # its inv_freq buffer is computed, not stored
    if init:
        model.init_weights()
    else:
        # buffers are state too: a checkpoint load fills the persistent ones, never the routers'
        # token counts (non-persistent), which would otherwise start as garbage memory
        for module in model.modules():
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
                module.tokens_per_expert.zero_()
    return model


@dataclass
class ChunkCarry:
    """The values a chunk's forward carries from block to block (cut at each exchange)."""

    h_BTD: torch.Tensor  # the residual stream (the MTP block's input inside an MTP depth)
    balance: torch.Tensor  # balance loss of the main layers so far
    mtp_balance: torch.Tensor | None = None  # of the MTP blocks so far (last piece, MTP on)
    lm: torch.Tensor | None = None  # main cross entropy (last piece, after the head)
    mtp_ce: list[torch.Tensor] = field(default_factory=list)  # cross entropy of each MTP depth run


@dataclass
class MoECarry:
    """What a MoE block keeps across its two exchanges."""

    f_BTD: torch.Tensor | None  # the FFN input, until the shared experts have run on it
    weight_NK: torch.Tensor  # gate weights for the combine
    balance: torch.Tensor  # this block's sequence-wise balance loss
    shared_BTD: torch.Tensor | None = None  # the shared experts' output


class DeepseekStage(StageBase):
    """Pipeline stage of one rank (see the module docstring).

    `microbatches` (given to `begin_step`) are (input_ids_BT, labels_BT) pairs, the same list on
    every pipeline rank of a data-parallel replica. `grad_scale` is 1 / data_parallel (= cp / dp: a
    sum over the cp ranks of a sequence, a mean over the replicas).
    """

    def __init__(
        self,
        model: DeepseekV3,
        *,
        layout: Layout,
        rank: int,
        specs: Sequence[PieceSpec],
        pp_group: dist.ProcessGroup | None = None,
        mtp_weight: float,
        grad_scale: float,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        overlap: bool = False,
        context: ContextParallel | None = None,
    ) -> None:
        """`context`: this rank's context-parallel group (None: each rank holds whole sequences);
        every cp rank gets the whole micro-batches and runs its rows of them."""
        self.model = model
        self.overlap = overlap
        self.context = context
        self.pp_group = pp_group
        self.autocast_dtype = autocast_dtype
        # called with a chunk's parameters once their gradients are final for the step
        self.on_chunk_grads_final: Any = None
        self._done: dict[int, int] = {}
        self.layout = layout
        self.rank = rank
        self.specs = {s.piece: s for s in specs}
        needed = set(rank_pieces(layout, rank=rank))
        if needed - set(self.specs):
            raise ValueError(f"DeepseekStage rank {rank}: pieces {sorted(needed - set(self.specs))} not built")
        self.mtp_weight = mtp_weight
        self.grad_scale = grad_scale
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        # Activations (and their gradients) cross pipeline stages in the autocast dtype: the next
        # stage's first GEMMs cast them to it anyway; only the residual stream is rounded once at
        # the boundary (it continues in self.dtype there). Half the point-to-point bytes under bf16.
        self.p2p_dtype = autocast_dtype or self.dtype
        self._microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._m = 1
        self._tapes: dict[tuple[int, int], Tape] = {}
        # B/W split: per segment (outputs, output gradients) that W still has to walk
        self._w_pending: dict[tuple[int, int], WeightGradStash] = {}  # B's stashes, for W
        self._split_cache: dict[int, tuple[list[nn.Module], list[nn.Parameter]]] = {}
        # per-step sums of detached loss parts on this rank: lm, mtp, balance (all pieces here)
        self.stats = torch.zeros(3, dtype=torch.float64)

    # ------------------------------------------------------------------ protocol: bookkeeping
    def begin_step(self, *, microbatches: Sequence[Any] | None, num_microbatches: int) -> None:
        if microbatches is None:
            raise ValueError("DeepseekStage needs the micro-batches (input_ids, labels) in every step")
        self._microbatches = microbatches
        self._m = num_microbatches
        self._done = {}
        self.stats.zero_()

    def sync_replica_grads(self) -> None:
        """DualPipe: sum every parameter's gradient with the rank holding the other replica.

        Rank r holds pieces {r, pp-1-r}, so does its peer pp-1-r: the two models have the same
        parameters, which are summed once each (a parameter in two pieces, the embedding, holds
        the gradient of both uses already). Both sides add a + b and b + a: the same float.
        """
        peers = {p for c in self.layout.chunks_on(self.rank) for p in self.layout.piece_ranks(self.layout.chunks[c].piece)}
        peers.discard(self.rank)
        if not peers:
            return
        if len(peers) != 1:
            raise ValueError(f"DeepseekStage rank {self.rank}: replicas on ranks {sorted(peers)}; only pairs are supported")
        (peer,) = peers
        peer_global = dist.get_global_rank(self.pp_group, peer) if self.pp_group is not None else peer
        params = [p for _, p in sorted(self.model.named_parameters()) if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        other = torch.empty_like(flat)
        ops = [dist.P2POp(dist.isend, flat, peer_global, self.pp_group),
               dist.P2POp(dist.irecv, other, peer_global, self.pp_group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        offset = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                g = other[offset : offset + n].view_as(p)
                p.grad = g.clone() if p.grad is None else p.grad + g
                offset += n

    def end_step(self) -> None:
        assert not self._tapes and not self._w_pending, (list(self._tapes), list(self._w_pending))
        self._microbatches = None

    def _meta(self, mb: int) -> TensorMeta:
        assert self._microbatches is not None
        ids = self._microbatches[mb][0]
        rows = ids.shape[1] // (self.context.size if self.context is not None else 1)  # this rank's rows
        return TensorMeta((ids.shape[0], rows, self.model.cfg.hidden_size), self.p2p_dtype)

    def input_meta(self, chunk: int, mb: int) -> TensorMeta:
        return self._meta(mb)

    def output_meta(self, chunk: int, mb: int) -> TensorMeta:
        return self._meta(mb)

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        spec = self.specs[self.layout.chunks[chunk].piece]
        m = self.model
        mods: list[nn.Module | None] = [m.layers[str(i)] for i in spec.layers]
        if spec.first:
            mods.append(m.embed_tokens)
        if spec.last:
            mods += [m.norm, m.lm_head, m.mtp]
            if not spec.first:
                mods.append(m.embed_tokens)
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for mod in mods:
            if mod is None:
                continue
            for p in mod.parameters():
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor:
        return drive(self.forward_steps(chunk, mb, x))

    def forward_steps(self, chunk: int, mb: int, x: torch.Tensor | None) -> Steps:
        """The chunk's forward; yields each in-flight all-to-all (none without cuts), returns y.

        Each resume runs under the stage's autocast, and only while it runs: an interleaved
        chunk's steps get their own entry.
        """
        steps = self._forward_steps(chunk, mb, x)
        while True:
            with self._amp():
                try:
                    handle = next(steps)
                except StopIteration as stop:
                    return stop.value
            yield handle

    def _amp(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _forward_steps(self, chunk: int, mb: int, x: torch.Tensor | None) -> Steps:
        assert self._microbatches is not None
        spec = self.specs[self.layout.chunks[chunk].piece]
        m = self.model
        ids_BT, labels_BT = self._microbatches[mb]
        ids_BT, labels_BT = ids_BT.to(self.device), labels_BT.to(self.device)
        T = ids_BT.shape[1]
        cp = self.context
        if cp is None:
            rope = m.rope(T, device=self.device, dtype=self.dtype)
            rows_ids_BT, rows_labels_BT = ids_BT, labels_BT
        else:  # this rank's rows of the sequences (megads.parallel.context_parallel)
            rope = cp.rope(m, T, dtype=self.dtype, device=self.device)
            pos_T = rope.shard.positions_T  # type: ignore[union-attr]
            rows_ids_BT, rows_labels_BT = ids_BT[:, pos_T], labels_BT[:, pos_T]
        tape = Tape()
        if spec.first:
            h_BTD = m.embed(rows_ids_BT)
        else:
            assert x is not None
            tape.add_input(x.requires_grad_(True))
            h_BTD = x.to(self.dtype)  # received in p2p_dtype; the residual stream goes on in self.dtype
        c = ChunkCarry(h_BTD=h_BTD, balance=h_BTD.new_zeros((), dtype=torch.float32))
        for i in spec.layers:
            c, b = yield from self._block_steps(tape, m.layers[str(i)], c, rope=rope)
            c.balance = c.balance + b
        if not spec.last:
            self.stats[2] += float(c.balance.detach())
            h_BTD = c.h_BTD.to(self.p2p_dtype)  # the receive buffers of the next stage have this dtype
            tape.finish([h_BTD] + ([c.balance] if c.balance.requires_grad else []))
            self._tapes[(chunk, mb)] = tape
            return h_BTD
        # last piece: head and CE, then the MTP depths (their blocks cut like the main ones); under
        # cp each rank's CE is its rows' sum over the whole sequence's label count
        c.lm = head_cross_entropy(m.head, c.h_BTD, rows_labels_BT, chunk_tokens=m.loss_chunk_tokens,
                                  denominator=None if cp is None else label_count(labels_BT))
        use_mtp = self.mtp_weight > 0 and bool(m.mtp)
        if use_mtp:
            c.mtp_balance = c.h_BTD.new_zeros((), dtype=torch.float32)
            for k, module in m.mtp_depths(T):
                if cp is None:
                    x_BTD, rope_k = m.mtp_input(module, k, c.h_BTD, ids_BT, rope)
                    labels_k_BT, denominator = labels_BT[:, k:], None
                else:  # rows i < T-k: embedding of token i+k, label of i+k+1, keys over the T-k positions
                    rope_k = cp.rope(m, T, limit=T - k, dtype=self.dtype, device=self.device)
                    pos_T = rope_k.shard.positions_T  # type: ignore[union-attr]
                    # the rows below T - k are a prefix of the previous depth's (positions ascend):
                    # a slice by a shape, not a boolean mask (which would read the device)
                    x_BTD = module.project(c.h_BTD[:, : pos_T.shape[0]], m.embed(ids_BT[:, pos_T + k]))
                    labels_k_BT, denominator = labels_BT[:, pos_T + k], label_count(labels_BT[:, k:])
                    rope = rope_k
                c.h_BTD = x_BTD
                c, b = yield from self._block_steps(tape, module.block, c, rope=rope_k)
                c.mtp_balance = c.mtp_balance + b
                c.mtp_ce.append(head_cross_entropy(partial(m.mtp_head, module), c.h_BTD, labels_k_BT,
                                                   chunk_tokens=m.loss_chunk_tokens, denominator=denominator))
        balance = c.balance + c.mtp_balance if c.mtp_balance is not None else c.balance
        assert c.lm is not None
        loss = total_loss(lm=c.lm, mtp_ce=c.mtp_ce, balance=balance, mtp_weight=self.mtp_weight)
        self.stats += torch.stack([loss.lm, loss.mtp, loss.balance]).double().cpu()
        tape.finish([loss.total])
        self._tapes[(chunk, mb)] = tape
        return loss.total

    def _block_steps(
        self, tape: Tape, block: TransformerBlock, c: ChunkCarry, *, rope: RopeCache
    ) -> Generator[Waitable, None, tuple[ChunkCarry, torch.Tensor]]:
        """One block on c.h_BTD -> (carry with the block's output, its balance loss).

        A MoE block runs its four steps (`MoE.route`, dispatch, `experts_forward`, combine);
        with cuts, the stage issues the two all-to-alls itself and the graph is cut at both.
        """
        moe = block.mlp
        if not (block.is_moe and isinstance(moe, MoE)):
            h_BTD, b = block(c.h_BTD, rope)
            return replace(c, h_BTD=h_BTD), b
        h_BTD = block.attention_step(c.h_BTD, rope)
        f_BTD = block.ffn_input(h_BTD)
        routing = moe.route(f_BTD)
        c = replace(c, h_BTD=h_BTD)
        disp = moe.dispatcher
        if not (self.overlap and isinstance(disp, AllToAllDispatcher)):
            d = moe.dispatch(f_BTD, routing)
            y_MD = moe.experts_forward(d)
            out_BTD = moe.combine(y_MD, d, routing, f_BTD)
            return replace(c, h_BTD=c.h_BTD + out_BTD), routing.balance_loss
        # cut: attention + router | dispatch a2a | experts + shared experts | combine a2a | sum
        x_ND = moe.dispatch_input(f_BTD)
        mc = MoECarry(f_BTD=f_BTD, weight_NK=routing.topk_weight_NK, balance=routing.balance_loss)
        dh = disp.dispatch_start(x_ND.detach(), routing.topk_idx_NK)
        c, mc = tape.cut(c, mc, sent=x_ND)
        yield dh.pending
        d = dh.wait()
        d = replace(d, x_MD=tape.receive(d.x_MD, reverse=_reverse(disp, "dispatch_backward_start", d)))
        y_MD = moe.experts_forward(d)
        # the shared experts run here, so this segment's compute (which hides the other chunk's
        # all-to-all) is not only the routed experts' small grouped GEMMs
        assert mc.f_BTD is not None
        mc = replace(mc, f_BTD=None, shared_BTD=moe.shared_forward(mc.f_BTD))
        ch = disp.combine_start(y_MD.detach(), d)
        c, mc = tape.cut(c, mc, sent=y_MD)
        yield ch.pending
        y_NKD = tape.receive(ch.wait(), reverse=_reverse(disp, "combine_backward_start", d))
        routing = replace(routing, topk_weight_NK=mc.weight_NK)
        out_BTD = moe.combine_output(y_NKD, routing, mc.shared_BTD, shape_BTD=c.h_BTD.shape)
        return replace(c, h_BTD=c.h_BTD + out_BTD), mc.balance

    def forward_backward_overlapped(
        self, f: ForwardArgs, b: BackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward of (f.chunk, f.mb) and full backward of (b.chunk, b.mb), interleaved at the a2as
        (with overlap off: the forward, then the backward)."""
        if not self.overlap:
            return super().forward_backward_overlapped(f, b)
        grad_x, y = interleave(
            self.backward_steps(b.chunk, b.mb, b.grad_y, weights=True), self.forward_steps(f.chunk, f.mb, f.x)
        )
        return y, grad_x

    # ------------------------------------------------------------------ backward
    def _output_grads(self, chunk: int, outs: list[torch.Tensor], grad_y: torch.Tensor) -> list[torch.Tensor]:
        s = self.grad_scale
        if self.layout.chunks[chunk].is_last:
            return [grad_y * s]
        grads = [grad_y]
        if len(outs) > 1:
            grads.append(outs[1].new_tensor(s / self._m))
        return grads

    def _accumulate(self, chunk: int, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None], *,
                    count: bool = True) -> None:
        """Add `grads` into the parameters' .grad; `count`: this completes the chunk's gradients
        for one micro-batch (the B of a B/W split does not: its W does)."""
        taken: set[int] = set()
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                # keep autograd's fresh buffer unless it is a view or shared by two parameters
                if g.is_contiguous() and g.data_ptr() not in taken and g.dtype == p.dtype:
                    p.grad = g.detach()
                else:
                    p.grad = g.detach().clone()
                taken.add(p.grad.data_ptr())
            else:
                p.grad.add_(g)
        if not count:
            return
        path_mbs = len(self.layout.path_microbatches[self.layout.chunks[chunk].path])
        self._done[chunk] = self._done.get(chunk, 0) + 1
        if self._done[chunk] == path_mbs and self.on_chunk_grads_final is not None:
            self.on_chunk_grads_final(params)

    def backward_steps(self, chunk: int, mb: int, grad_y: torch.Tensor, *, weights: bool) -> Steps:
        """Backward of the chunk along its tape, yielding each reverse all-to-all; returns grad_x.

        weights=True: input and parameter gradients (BW); False: the input gradient only (B),
        what W needs kept.
        """
        tape = self._tapes.pop((chunk, mb))
        grads = self._output_grads(chunk, tape.segments[-1].outs, grad_y)
        if weights:
            params = self.chunk_parameters(chunk)
            got = yield from tape.backward(grads, params, weights=True)
            self._accumulate(chunk, params, got.params)
        else:
            # B: input gradients, and those of the parameters that are not GEMM weights (norms,
            # router, embedding: cheap); the GEMM layers stash what their weight gradients need
            layers, others = self._deferral_split(chunk)
            stash = WeightGradStash()
            got = yield from tape.backward(grads, others, weights=False, defer=lambda: deferring(layers, stash))
            self._accumulate(chunk, others, got.params, count=False)
            self._w_pending[(chunk, mb)] = stash
        if self.specs[self.layout.chunks[chunk].piece].first:
            return None
        x = tape.segments[0].leaves[0]
        return got.inputs[0] if got.inputs[0] is not None else torch.zeros_like(x)

    def backward_full(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        return drive(self.backward_steps(chunk, mb, grad_y, weights=True))

    def backward_input(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        return drive(self.backward_steps(chunk, mb, grad_y, weights=False))

    def _deferral_split(self, chunk: int) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The chunk's GEMM layers (weight gradients deferred to W) and its other parameters
        (gradients in B); found once per chunk, the parameters being fixed after construction."""
        if chunk not in self._split_cache:
            params = self.chunk_parameters(chunk)
            layers = deferrable_layers_of(self.model, params)
            gemm = {id(m.weight) for m in layers}
            self._split_cache[chunk] = (layers, [p for p in params if id(p) not in gemm])
        return self._split_cache[chunk]

    def backward_weight(self, chunk: int, mb: int) -> None:
        """W: the GEMM weight gradients B stashed, one GEMM per layer use (no graph walk)."""
        params = self.chunk_parameters(chunk)
        grads = self._w_pending.pop((chunk, mb)).compute()
        self._accumulate(chunk, params, [grads.get(id(p)) for p in params])


def deferrable_layers_of(model: nn.Module, params: Sequence[nn.Parameter]) -> list[nn.Module]:
    """The GEMM layers of `model` whose weight is one of `params` (one chunk's)."""
    ids = {id(p) for p in params}
    return [m for m in deferrable_layers(model) if id(m.weight) in ids]


def _reverse(disp: AllToAllDispatcher, method: str, result: DispatchResult) -> Reverse:
    """The reverse exchange of `result`, looked up on the dispatcher when the backward issues it."""
    return lambda grad: getattr(disp, method)(grad, result)
