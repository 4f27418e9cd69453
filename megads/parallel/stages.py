"""The DeepSeek-V3 pipeline stage: model pieces on ranks, their forward and backward pieces.

The model's L transformer layers are cut into `layout.num_pieces` consecutive pieces (layer
counts from `plan_layout`). Piece 0 also holds the embedding, the last piece the final norm,
the output head and the MTP modules. MTP needs the embedding too, so the rank of the last piece
keeps a copy of `embed_tokens`; ZeRO-1 keeps the two copies equal by summing their gradients
over the mesh's embed group (Megatron's tied-embedding rule). When both ends live on one rank
(pp = 1, or DualPipeV's V placement) there is a single embedding and nothing to sync.

`build_stage_model` builds the whole model under a seed (so every layout starts from the
weights a single process would have) and deletes what the rank does not hold; `layers` stays a
string-keyed ModuleDict so parameter names match the single-process model.

`DeepseekStage` implements `pipeline.stage.PipelineStage` for one rank:

    forward(chunk, mb, x): first piece embeds micro-batch mb's tokens, every piece runs its
        layers (summing their sequence-wise balance losses), the last piece adds the head,
        the MTP modules and returns the micro-batch loss L = CE + lambda * MTP + balance(last)
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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megads.model.config import ModelConfig
from megads.model.transformer import DeepseekV3, cross_entropy, mtp_loss
from pipeline.actions import Layout
from pipeline.stage import StageBase, TensorMeta


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
    cfg: ModelConfig, *, specs: Sequence[PieceSpec], seed: int, dtype: torch.dtype = torch.float32
) -> DeepseekV3:
    """The single-process model under `seed`, pruned to the pieces `specs` (this rank's)."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg)
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
    return model.to(dtype)


class DeepseekStage(StageBase):
    """Pipeline stage of one rank (see the module docstring).

    `microbatches` (given to `begin_step`) are (input_ids_BT, labels_BT) pairs, the same list on
    every pipeline rank of a data-parallel replica. `grad_scale` is 1/dp.
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
    ) -> None:
        self.model = model
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
        self._microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._m = 1
        self._saved: dict[tuple[int, int], tuple[torch.Tensor | None, list[torch.Tensor]]] = {}
        self._grads: dict[tuple[int, int], list[torch.Tensor]] = {}
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
        assert not self._saved and not self._grads, (list(self._saved), list(self._grads))
        self._microbatches = None

    def _meta(self, mb: int) -> TensorMeta:
        assert self._microbatches is not None
        ids = self._microbatches[mb][0]
        return TensorMeta((ids.shape[0], ids.shape[1], self.model.cfg.hidden_size), self.dtype)

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
        if self.autocast_dtype is None:
            return self._forward(chunk, mb, x)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self._forward(chunk, mb, x)

    def _forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor:
        assert self._microbatches is not None
        spec = self.specs[self.layout.chunks[chunk].piece]
        m = self.model
        ids_BT, labels_BT = self._microbatches[mb]
        ids_BT, labels_BT = ids_BT.to(self.device), labels_BT.to(self.device)
        rope = m.rope(ids_BT.shape[1], device=self.device, dtype=self.dtype)
        inp: torch.Tensor | None = None
        if spec.first:
            h_BTD = m.embed(ids_BT)
        else:
            assert x is not None
            inp = x.requires_grad_(True)
            h_BTD = inp
        balance = h_BTD.new_zeros((), dtype=torch.float32)
        for i in spec.layers:
            h_BTD, b = m.layers[str(i)](h_BTD, rope)
            balance = balance + b
        if spec.last:
            lm = cross_entropy(m.head(h_BTD), labels_BT)
            total = lm
            mtp = lm.new_zeros(())
            if self.mtp_weight > 0 and m.mtp:
                mtp_logits, mtp_balance = m.mtp_forward(h_BTD, ids_BT, rope)
                balance = balance + mtp_balance
                mtp = mtp_loss(mtp_logits, labels_BT)
                if mtp_logits:
                    total = total + self.mtp_weight * mtp
            total = total + balance
            self.stats += torch.stack([lm.detach(), mtp.detach(), balance.detach()]).double().cpu()
            self._saved[(chunk, mb)] = (inp, [total])
            return total
        self.stats[2] += float(balance.detach())
        h_BTD = h_BTD.to(self.dtype)  # the receive buffers of the next stage have the parameters' dtype
        outs = [h_BTD] + ([balance] if balance.requires_grad else [])
        self._saved[(chunk, mb)] = (inp, outs)
        return h_BTD

    # ------------------------------------------------------------------ backward
    def _output_grads(self, chunk: int, outs: list[torch.Tensor], grad_y: torch.Tensor) -> list[torch.Tensor]:
        s = self.grad_scale
        if self.layout.chunks[chunk].is_last:
            return [grad_y * s]
        grads = [grad_y]
        if len(outs) > 1:
            grads.append(outs[1].new_tensor(s / self._m))
        return grads

    def _accumulate(self, chunk: int, params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
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
        path_mbs = len(self.layout.path_microbatches[self.layout.chunks[chunk].path])
        self._done[chunk] = self._done.get(chunk, 0) + 1
        if self._done[chunk] == path_mbs and self.on_chunk_grads_final is not None:
            self.on_chunk_grads_final(params)

    def backward_full(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        inp, outs = self._saved.pop((chunk, mb))
        grads = self._output_grads(chunk, outs, grad_y)
        params = self.chunk_parameters(chunk)
        wants_x = inp is not None
        targets = ([inp] if wants_x else []) + params
        got = torch.autograd.grad(outs, targets, grads, allow_unused=True)
        self._accumulate(chunk, params, got[1:] if wants_x else got)
        return got[0] if wants_x else None

    def backward_input(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        inp, outs = self._saved[(chunk, mb)]
        grads = self._output_grads(chunk, outs, grad_y)
        self._grads[(chunk, mb)] = grads
        if inp is None:
            return None
        (grad_x,) = torch.autograd.grad(outs, [inp], grads, retain_graph=True)
        return grad_x

    def backward_weight(self, chunk: int, mb: int) -> None:
        _, outs = self._saved.pop((chunk, mb))
        grads = self._grads.pop((chunk, mb))
        params = self.chunk_parameters(chunk)
        got = torch.autograd.grad(outs, params, grads, allow_unused=True)
        self._accumulate(chunk, params, got)
