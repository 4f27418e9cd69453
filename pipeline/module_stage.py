"""A generic stage over `nn.Module` pieces: any sequential model can be pipelined with it.

The model is cut into `layout.num_pieces` pieces (piece p maps the activation entering it to the
one leaving it; piece 0 reads the micro-batch, the last piece's output goes to `loss_fn`). A rank
holds the pieces of its chunks (`layout.chunks_on(rank)`); DualPipe's two replicas of a piece are
two separate modules on two ranks, kept identical by `sync_replica_grads`.

B/W split with `torch.autograd.grad`:
    B: grad_x = autograd.grad(y, x, grad_y, retain_graph=True)  (the graph stays for W)
    W: grads  = autograd.grad(y, params, grad_y)                (frees the graph), added to .grad
    BW: both in one call. On a first chunk (input without gradient) B has nothing to do and W does
    the whole backward. W re-walks the part of the graph between y and the weights; a model that
    wants B and W to share that work overrides `backward_input` / `backward_weight`.

Per-step state (saved graphs, pending output gradients) is kept in the instance and must be empty
at the end of a step. `peak_live` counts the most (chunk, mb) graphs held at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from megads.pipeline.actions import Layout
from megads.pipeline.stage import StageBase, TensorMeta
from torch import nn


def _default_input(microbatch: Any) -> torch.Tensor:
    return microbatch[0] if isinstance(microbatch, (tuple, list)) else microbatch


class ModuleStage(StageBase):
    """Stage of pipeline rank `rank` holding `modules[piece]` for each piece of its chunks.

    loss_fn(output_of_last_piece, microbatch) -> scalar loss of one micro-batch (not scaled).
    input_fn(microbatch) -> input of piece 0 (default: microbatch[0] for tuples, else microbatch).
    activation_meta: TensorMeta of the activation entering piece p >= 1 (one for all pieces, or a
    function (piece, mb) -> TensorMeta).
    """

    def __init__(
        self,
        modules: Mapping[int, nn.Module],
        *,
        layout: Layout,
        rank: int,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        activation_meta: TensorMeta | Callable[[int, int], TensorMeta],
        input_fn: Callable[[Any], torch.Tensor] = _default_input,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        needed = {layout.chunks[c].piece for c in layout.chunks_on(rank)}
        missing = needed - set(modules)
        if missing:
            raise ValueError(
                f"ModuleStage rank {rank}: modules for pieces {sorted(missing)} missing (has {sorted(modules)})"
            )
        self.modules = dict(modules)
        self.layout = layout
        self.rank = rank
        self.loss_fn = loss_fn
        self.input_fn = input_fn
        self._meta = activation_meta
        self.group = group
        self.device = torch.device(device)
        self._microbatches: Sequence[Any] | None = None
        self._saved: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._grad_y: dict[tuple[int, int], torch.Tensor] = {}
        self.peak_live = 0

    # ------------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [p for piece in sorted(self.modules) for p in self.modules[piece].parameters()]

    def _params(self, chunk: int) -> list[nn.Parameter]:
        return [p for p in self.modules[self.layout.chunks[chunk].piece].parameters() if p.requires_grad]

    def begin_step(self, *, microbatches: Sequence[Any] | None, num_microbatches: int) -> None:
        self._microbatches = microbatches
        self.peak_live = 0

    def end_step(self) -> None:
        assert not self._saved and not self._grad_y, (list(self._saved), list(self._grad_y))
        self._microbatches = None

    def _meta_of_piece(self, piece: int, mb: int) -> TensorMeta:
        return self._meta(piece, mb) if callable(self._meta) else self._meta

    def input_meta(self, chunk: int, mb: int) -> TensorMeta:
        return self._meta_of_piece(self.layout.chunks[chunk].piece, mb)

    def output_meta(self, chunk: int, mb: int) -> TensorMeta:
        nxt = self.layout.chunks[chunk].next
        assert nxt is not None, "a last chunk's output is its loss"
        return self._meta_of_piece(self.layout.chunks[nxt].piece, mb)

    # ------------------------------------------------------------------------------------------
    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor:
        info = self.layout.chunks[chunk]
        if info.is_first or info.is_last:
            if self._microbatches is None:
                raise ValueError(
                    f"rank {self.rank} holds a first/last chunk and needs the micro-batches in step()"
                )
            microbatch = self._microbatches[mb]
        if info.is_first:
            inp = self.input_fn(microbatch).to(self.device)
        else:
            assert x is not None
            inp = x.requires_grad_(True)
        y = self.modules[info.piece](inp)
        if info.is_last:
            y = self.loss_fn(y, microbatch)
        self._saved[(chunk, mb)] = (inp, y)
        self.peak_live = max(self.peak_live, len(self._saved))
        return y

    @staticmethod
    def _accumulate(params: Sequence[nn.Parameter], grads: Sequence[torch.Tensor | None]) -> None:
        for p, g in zip(params, grads):
            if g is None:
                continue
            if p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g)

    def backward_input(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        inp, y = self._saved[(chunk, mb)]
        self._grad_y[(chunk, mb)] = grad_y
        if not inp.requires_grad:
            return None
        (grad_x,) = torch.autograd.grad(y, inp, grad_y, retain_graph=True)
        return grad_x

    def backward_weight(self, chunk: int, mb: int) -> None:
        _, y = self._saved.pop((chunk, mb))
        grad_y = self._grad_y.pop((chunk, mb))
        params = self._params(chunk)
        grads = torch.autograd.grad(y, params, grad_y, allow_unused=True)
        self._accumulate(params, grads)

    def backward_full(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        inp, y = self._saved.pop((chunk, mb))
        params = self._params(chunk)
        wants_x = inp.requires_grad
        grads = torch.autograd.grad(y, ([inp] if wants_x else []) + params, grad_y, allow_unused=True)
        self._accumulate(params, grads[1:] if wants_x else grads)
        return grads[0] if wants_x else None

    # ------------------------------------------------------------------------------------------
    def sync_replica_grads(self) -> None:
        """Sum the gradients of every replicated piece with its other replica (DualPipe's pairs).

        Both ranks of a pair exchange flat gradient buffers, pieces in increasing order, and add
        (a + b on one side, b + a on the other: the same float result), so the replicas stay equal.
        """
        ops: list[dist.P2POp] = []
        pending: list[tuple[list[nn.Parameter], torch.Tensor]] = []
        for piece in sorted(self.modules):
            ranks = self.layout.piece_ranks(piece)
            if len(ranks) == 1:
                continue
            if len(ranks) != 2 or self.rank not in ranks:
                raise ValueError(f"piece {piece} is held by ranks {ranks}; sync_replica_grads supports pairs")
            peer = ranks[0] if ranks[1] == self.rank else ranks[1]
            peer_global = dist.get_global_rank(self.group, peer) if self.group is not None else peer
            params = [p for p in self.modules[piece].parameters() if p.requires_grad]
            flat = torch.cat(
                [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
            )
            recv = torch.empty_like(flat)
            ops += [
                dist.P2POp(dist.isend, flat, peer_global, self.group),
                dist.P2POp(dist.irecv, recv, peer_global, self.group),
            ]
            pending.append((params, recv))
        if not ops:
            return
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        for params, recv in pending:
            offset = 0
            for p in params:
                n = p.numel()
                other = recv[offset : offset + n].view_as(p)
                p.grad = other.clone() if p.grad is None else p.grad + other
                offset += n
