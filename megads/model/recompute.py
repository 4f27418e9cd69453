"""Activation recomputation, applied to a built model from outside (the math stays as it is).

    none       autograd keeps what every op saves
    selective  the attention module (MLA: projections, rope, the attention core), the routed
               experts' and the shared experts' SwiGLU MLPs and the dense MLPs keep only their
               inputs; their insides (per-head keys/values, attention outputs, the [tokens,
               intermediate] activations) are recomputed in the backward. The norms, the router
               and the residual stream stay stored: cheap to keep.
    full       every block keeps only what crosses its boundaries: a dense block is recomputed
               whole from its input; a MoE block from the inputs of its local segments, the
               attention step (norm + attention + residual) and the expert MLPs (as selective)

Each chosen piece is run under `torch.utils.checkpoint` (non-reentrant), installed as an
instance attribute, so parameter names, state dicts and the modules a pipeline stage calls stay
unchanged. Never recomputed: the router (its load counts are a side effect, and its top-k must
not be taken twice) and the expert all-to-alls (a collective in a backward would have to run in
the same order on every rank); a MoE block's recomputed segments sit between them, so recompute
composes with every pipeline schedule, the B/W split (the W pass recomputes again: checkpoint
supports a retained graph) and the F&B overlap, whose cuts are at those all-to-alls.

Recomputation runs the same ops on the same inputs, so losses and gradients are those of `none`
(tests/test_recompute.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def _recomputed(fn: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)

    run.__wrapped__ = fn  # type: ignore[attr-defined]
    run.recomputed = True  # type: ignore[attr-defined]
    return run


def _wrap_forward(module: nn.Module) -> None:
    # once; a forward replaced by someone else (megads.parallel.compile) is wrapped in turn
    if not getattr(module.forward, "recomputed", False):
        module.forward = _recomputed(module.forward)  # type: ignore[method-assign]


def apply_recompute(model: nn.Module, mode: str) -> int:
    """Install `mode` on every transformer block of `model` (main layers and MTP); returns the
    number of pieces recomputed. ValueError for an unknown mode."""
    from megads.model.block import TransformerBlock
    from megads.model.mlp import MLP
    from megads.model.moe import MoE

    if mode not in MODES:
        raise ValueError(f"memory.recompute={mode!r} must be one of {list(MODES)}")
    if mode == "none":
        return 0
    count = 0
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        if mode == "full" and not block.is_moe:
            _wrap_forward(block)
            count += 1
            continue
        if mode == "full" and "attention_step" not in vars(block):
            block.attention_step = _recomputed(block.attention_step)  # type: ignore[method-assign]
            count += 1
        else:
            _wrap_forward(block.self_attn)
            count += 1
        mlp = block.mlp
        pieces = [mlp.experts, mlp.shared_experts] if isinstance(mlp, MoE) else [mlp] if isinstance(mlp, MLP) else []
        for piece in pieces:
            if piece is not None:
                _wrap_forward(piece)
                count += 1
    return count
