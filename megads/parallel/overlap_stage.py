"""The segmented autograd graph that lets a stage's F&B overlap expert all-to-alls with compute.

`DeepseekStage` (megads.parallel.stages) writes a chunk's forward once, as a generator. With
`overlap=True` and an all-to-all dispatcher, the forward is cut into *segments* at the
expert-parallel communication points of every MoE block,

    segment        attention + ffn_input + route                       (then dispatch all-to-all)
    segment        local experts on the received rows + shared experts (then combine all-to-all)
    segment        gate-weighted sum + residual, and the next block's attention ...

and this module keeps them on a `Tape`. At a boundary (`Tape.cut`) every carried tensor with a
gradient (a field of one of the stage's small carry dataclasses) is detached and marked
`requires_grad`: a leaf of the next segment. The value sent through the all-to-all is the
segment's `sent`; the rows that arrive become the next segment's `received` leaf, together
with the `Reverse` that sends their gradient back (the dispatcher's `*_backward_start`).
Without a cut (overlap off, or ep = 1) a chunk's tape is one segment.

`Tape.backward` walks the segments in reverse: `autograd.grad` of one segment's outputs gives
its leaves' gradients, which are the previous segment's output gradients; across an exchange
the gradient goes through the reverse all-to-all, yielded while in flight. B/W split: B walks
the graph once for the leaf gradients (with the a2a backward) and the non-GEMM parameters'
while every GEMM layer stashes its input and output gradient (`megads.model.linear.deferring`);
W is then one weight-gradient GEMM per layer use from the stash: no graph walk, no communication.

Forward and backward are generators yielding each in-flight all-to-all, so

    forward_backward_overlapped(f, b) = pipeline.overlap.interleave(backward(b), forward(f))

runs B combine-backward a2a | F attention, issue dispatch | B experts backward, issue
dispatch-backward a2a | F experts, issue combine | ... -- every all-to-all of one chunk is in
flight while the other chunk computes. Plain F, B, W and BW actions `drive` the same
generators to completion, one handle at a time.

Shapes: as in megads.parallel.stages.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch

from megads.pipeline.overlap import Waitable, interleave

Steps = Generator[Waitable, None, Any]


def drive(steps: Steps) -> Any:
    """Run one step generator to completion, waiting on each handle at once (no overlap)."""
    return interleave(steps)[0]


class ReverseHandle(Protocol):
    """A reverse all-to-all in flight (`expert_parallel.GradHandle`)."""

    pending: Any

    def wait(self) -> torch.Tensor: ...


# issues the reverse all-to-all of a received value's gradient; the handle gives the sent value's
Reverse = Callable[[torch.Tensor], ReverseHandle]


@dataclass
class Segment:
    """One piece of a chunk's forward between two communication points."""

    leaves: list[torch.Tensor]  # cut values of the previous segment (or the chunk input), as leaves
    received: torch.Tensor | None = None  # rows that came over the exchange closing the previous segment
    reverse: Reverse | None = None  # sends `received`'s gradient back (set with `received`)
    outs: list[torch.Tensor] = field(default_factory=list)  # outs[i] became the next segment's leaves[i]
    sent: torch.Tensor | None = None  # the value sent over the exchange that closes this segment

    def inputs(self) -> list[torch.Tensor]:
        return self.leaves + ([self.received] if self.received is not None else [])

    def outputs(self) -> list[torch.Tensor]:
        return self.outs + ([self.sent] if self.sent is not None else [])


@dataclass
class TapeGrads:
    """What `Tape.backward` returns."""

    inputs: list[torch.Tensor | None]  # gradient of each leaf of the first segment (the chunk input first)
    params: list[torch.Tensor | None]  # summed gradients of the `params` asked for


@dataclass
class Tape:
    """Segments of one chunk's forward, closed at each exchange."""

    segments: list[Segment] = field(default_factory=list)
    current: Segment = field(default_factory=lambda: Segment(leaves=[]))

    def add_input(self, x: torch.Tensor) -> None:
        """The chunk's input activation (a leaf of the first segment)."""
        self.current.leaves.append(x)

    def cut(self, *values: Any, sent: torch.Tensor) -> tuple[Any, ...]:
        """Close the current segment before sending `sent`; `values` are the carry dataclasses.

        Returns them with every tensor field (or list element) that has a gradient replaced by
        a leaf of the next segment.
        """
        seg, nxt = self.current, Segment(leaves=[])

        def leaf(t: Any) -> Any:
            if not (isinstance(t, torch.Tensor) and t.requires_grad):
                return t
            new = t.detach().requires_grad_(True)
            seg.outs.append(t)
            nxt.leaves.append(new)
            return new

        out = []
        for v in values:
            changes = {}
            for f in fields(v):
                x = getattr(v, f.name)
                changes[f.name] = [leaf(t) for t in x] if isinstance(x, list) else leaf(x)
            out.append(replace(v, **changes))
        seg.sent = sent
        self.segments.append(seg)
        self.current = nxt
        return tuple(out)

    def receive(self, t: torch.Tensor, *, reverse: Reverse) -> torch.Tensor:
        """The rows that arrived over the exchange that closed the previous segment, as a leaf."""
        leaf = t.detach().requires_grad_(True)
        self.current.received, self.current.reverse = leaf, reverse
        return leaf

    def finish(self, outs: list[torch.Tensor]) -> None:
        self.current.outs = list(outs)
        self.segments.append(self.current)

    def backward(
        self, grad_outs: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *, weights: bool,
        defer: Callable[[], AbstractContextManager[Any]] | None = None,
    ) -> Generator[Waitable, None, TapeGrads]:
        """Segments in reverse, yielding each reverse all-to-all; `grad_outs` of the last segment's outs.

        weights=True: leaf and parameter gradients at once (BW). False: the B of a B/W split,
        under `defer` (a context in which the GEMM layers hand their weight gradients to a stash,
        `megads.model.linear.deferring`): leaf gradients and those of `params` (the parameters
        that are not GEMM weights) now; W later takes the GEMM weights' from the stash, one GEMM
        per layer use, without walking the graph again.
        """
        assert weights or defer is not None, "a B without deferred weight gradients has no W to go with"
        acc: list[torch.Tensor | None] = [None] * len(params)
        grads: list[torch.Tensor | None] = list(grad_outs)  # of the segment's outs
        grad_sent: torch.Tensor | None = None  # of the segment's sent value
        grad_in: list[torch.Tensor | None] = []
        for seg in reversed(self.segments):
            pairs = [(o, g) for o, g in zip(seg.outputs(), [*grads, grad_sent]) if g is not None]
            outs, gouts = [o for o, _ in pairs], [g for _, g in pairs]
            inputs = seg.inputs()
            if outs and (inputs or params):
                with defer() if defer is not None else nullcontext():
                    got = torch.autograd.grad(outs, inputs + list(params), gouts, allow_unused=True)
                grad_in = list(got[: len(inputs)])
                _add_into(acc, got[len(inputs) :])
            else:
                grad_in = [None] * len(inputs)
            grads, grad_sent = grad_in[: len(seg.leaves)], None
            if seg.received is not None:
                assert seg.reverse is not None
                g = grad_in[-1]
                with torch.no_grad():  # every ep rank must take part in the exchange
                    handle = seg.reverse(torch.zeros_like(seg.received) if g is None else g)
                yield handle.pending
                with torch.no_grad():
                    grad_sent = handle.wait()
        return TapeGrads(inputs=grads, params=acc)


def _add_into(acc: list[torch.Tensor | None], got: Sequence[torch.Tensor | None]) -> None:
    for i, g in enumerate(got):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g
