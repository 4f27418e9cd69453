"""The stage protocol: what a model supplies so that `PipelineRuntime` can run any schedule on it.

A stage is the per-rank object that holds the rank's chunks (see `pipeline.actions.Layout`) and
does their compute; the runtime does everything else (ordering, point-to-point exchange, loss
scaling, local hand-offs between two chunks of the same rank). Calls, per step:

    begin_step(microbatches=..., num_microbatches=M)
    forward(chunk, mb, x) -> y            x is None on a path's first chunk (read micro-batch mb);
                                          on a path's last chunk y is the micro-batch's scalar loss
    backward_input(chunk, mb, grad_y)     -> grad_x (None on a first chunk); keeps what W needs
    backward_weight(chunk, mb)            accumulates parameter gradients into .grad
    backward_full(chunk, mb, grad_y)      -> grad_x; both at once
    forward_backward_overlapped(f, b)     -> (y of f, grad_x of b); default runs them one after
                                          the other; a model overrides it to interleave sub-steps
    sync_replica_grads()                  after the last action: sum gradients of replicated
                                          pieces (DualPipe) across their ranks
    end_step()

`grad_y` of a last chunk is the loss scale 1/M as a 0-d tensor, so every micro-batch loss enters
the gradient divided by the number of micro-batches. `input_meta` / `output_meta` give the
shape and dtype of the activation entering / leaving a chunk, for receive buffers. Received and
handed-off activations arrive detached; the stage marks them `requires_grad_()` itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of one activation tensor exchanged between stages."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


@dataclass(frozen=True)
class ForwardArgs:
    chunk: int
    mb: int
    x: torch.Tensor | None


@dataclass(frozen=True)
class BackwardArgs:
    chunk: int
    mb: int
    grad_y: torch.Tensor


@runtime_checkable
class PipelineStage(Protocol):
    """What `PipelineRuntime` calls; `StageBase` provides the optional parts."""

    device: torch.device

    def begin_step(self, *, microbatches: Sequence[Any] | None, num_microbatches: int) -> None: ...

    def input_meta(self, chunk: int, mb: int) -> TensorMeta: ...

    def output_meta(self, chunk: int, mb: int) -> TensorMeta: ...

    def forward(self, chunk: int, mb: int, x: torch.Tensor | None) -> torch.Tensor: ...

    def backward_input(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None: ...

    def backward_weight(self, chunk: int, mb: int) -> None: ...

    def backward_full(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None: ...

    def forward_backward_overlapped(
        self, f: ForwardArgs, b: BackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def sync_replica_grads(self) -> None: ...

    def end_step(self) -> None: ...


class StageBase:
    """Defaults for the optional parts of the protocol; subclasses implement the rest."""

    device: torch.device = torch.device("cpu")

    def begin_step(self, *, microbatches: Sequence[Any] | None, num_microbatches: int) -> None:
        return None

    def backward_full(self, chunk: int, mb: int, grad_y: torch.Tensor) -> torch.Tensor | None:
        grad_x = self.backward_input(chunk, mb, grad_y)  # type: ignore[attr-defined]
        self.backward_weight(chunk, mb)  # type: ignore[attr-defined]
        return grad_x

    def forward_backward_overlapped(
        self, f: ForwardArgs, b: BackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sequential default: the forward, then the full backward."""
        y = self.forward(f.chunk, f.mb, f.x)  # type: ignore[attr-defined]
        grad_x = self.backward_full(b.chunk, b.mb, b.grad_y)
        return y, grad_x

    def sync_replica_grads(self) -> None:
        return None

    def end_step(self) -> None:
        return None
