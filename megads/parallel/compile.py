"""`compile: true`: torch.compile applied to every transformer block from outside, piece by piece.

torchtitan compiles each transformer block as one unit (`torch.compile(block, fullgraph=True)`).
Two things of ours do not fit that unit, so the block is compiled as the pieces a pipeline stage
calls (`megads.parallel.stages.DeepseekStage._block_steps`, `TransformerBlock.forward` alike):

    compiled (one graph each)                   eager
    input / post-attention RMSNorm              the GEMM layers (`Linear`) under a schedule with a
    MLA: rope, concatenations, SDPA, reshapes     B/W split (zb1p, DualPipe, DualPipeV)
    SwiGLU of the dense MLP / shared experts    the routed experts (`RoutedExperts`), the dispatch
    the router (sigmoid, group-limited top-k,     and combine (all-to-all, `.tolist()` of counts)
      balance loss, token counts)               the residual adds between pieces
    the MoE's gate-weighted combine
    the GEMMs, without a B/W split

* The expert all-to-alls sit *between* pieces: the F&B overlap (`overlap_fb`) cuts a MoE block's
  graph at both exchanges and interleaves two chunks there, so a graph spanning a whole MoE block
  could not exist; at piece granularity the cuts fall between compiled graphs, never inside one.
* Under a schedule with a B/W split (`eager_gemms=True`: zb1p, DualPipe, DualPipeV) the GEMM
  layers run eagerly (`torch.compiler.disable` on their forward, the one graph break per GEMM).
  Their custom autograd functions hand the weight gradient to a `WeightGradStash` when the B of
  the split runs (`megads.model.linear.deferring`); the stash is consulted in the *backward*, at
  run time. AOTAutograd traces a backward once, when the stash is empty, so a compiled GEMM would
  bake "weight gradient now" into the graph and every B would silently drop its weight gradients
  (W would find nothing). Eager GEMMs keep the split exact; the GEMMs are library calls (MKL /
  cuBLAS) either way, what compile fuses is the elementwise and normalisation work around them.
  Without a split (`eager_gemms=False`: one process, 1F1B, interleaved) the GEMMs are traced into
  the graphs (fewer graph breaks, less Python per step), and their weight-gradient slots refuse a
  stash, so a B/W split on such a model fails loudly instead of losing gradients.
* The routed experts take their per-expert row counts (a `GroupCounts`, on the device or the
  host) whose values change every step: a graph over them would specialise on them and recompile.
  They stay eager (one grouped GEMM each, item 1).

The pieces are compiled by replacing the module's `forward` (or the block's / MoE's method) with
an instance attribute, so parameter names, state dicts and checkpoints do not change. Apply it
*before* activation recomputation (`megads.model.recompute` then checkpoints the compiled pieces).
Dynamo keys its cache by code object and, inlining nn.Modules, makes the parameters graph inputs:
all blocks of one kind share one compiled graph per input shape (the MTP block's T-1 tokens add a
dynamic-shape variant).

Exactness: the compiled pieces compute the same functions with fused kernels; losses and
gradients agree with eager within float32 rounding (tests/test_compile.py, 1e-5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megads.model.block import TransformerBlock
from megads.model.linear import WeightGradSlot, deferrable_layers
from megads.model.mlp import MLP
from megads.model.moe import MoE
from megads.model.norm import RMSNorm

BACKENDS = ("inductor", "aot_eager", "eager")


def _compiled(fn: Any, backend: str) -> Any:
    out = torch.compile(fn, backend=backend)
    out.__wrapped__ = fn  # type: ignore[attr-defined]
    return out


def _compile_forward(module: nn.Module, backend: str) -> int:
    if "forward" in vars(module):  # once (or already wrapped by someone else: leave it)
        return 0
    module.forward = _compiled(module.forward, backend)  # type: ignore[method-assign]
    return 1


class _UndeferrableSlot(WeightGradSlot):
    """The weight-gradient slot of a GEMM traced into a compiled graph: its backward was traced
    with "weight gradient now", so a stash can never take effect; setting one is an error."""

    @property  # type: ignore[override]
    def stash(self) -> None:
        return None

    @stash.setter
    def stash(self, value: object) -> None:
        if value is not None:
            raise RuntimeError(
                "a B/W split (deferred weight gradients) on a model compiled with its GEMMs inside the "
                "graphs: apply_compile(..., eager_gemms=True) for schedules that split B and W")


def apply_compile(model: nn.Module, *, backend: str = "inductor", eager_gemms: bool = True) -> int:
    """Compile the pieces of every transformer block of `model` (main layers and MTP blocks);
    returns the number of pieces compiled (see the module docstring).

    `backend`: torch.compile's backend (`inductor` for training; `aot_eager` traces through
    Dynamo and AOTAutograd without generating code, what the fast tests use). `eager_gemms`: the
    GEMM layers stay outside the graphs, which a B/W split needs; False traces them in and makes
    their weight-gradient slots refuse a stash.
    """
    if backend not in BACKENDS:
        raise ValueError(f"compile backend {backend!r} must be one of {list(BACKENDS)}")
    for layer in deferrable_layers(model):
        if eager_gemms:
            if "forward" not in vars(layer):
                layer.forward = torch.compiler.disable(layer.forward)  # type: ignore[method-assign]
        elif not isinstance(layer.wgrad_slot, _UndeferrableSlot):
            layer.wgrad_slot = _UndeferrableSlot(layer)
    count = 0
    for block in [m for m in model.modules() if isinstance(m, TransformerBlock)]:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            assert isinstance(norm, RMSNorm)
            count += _compile_forward(norm, backend)
        count += _compile_forward(block.self_attn, backend)
        mlp = block.mlp
        if isinstance(mlp, MLP):
            count += _compile_forward(mlp, backend)
        elif isinstance(mlp, MoE):
            count += _compile_forward(mlp.gate, backend)
            if mlp.shared_experts is not None:
                count += _compile_forward(mlp.shared_experts, backend)
            if "combine_output" not in vars(mlp):
                mlp.combine_output = _compiled(mlp.combine_output, backend)  # type: ignore[method-assign]
                count += 1
    return count
