"""Token cross entropy of the output head, optionally in sequence chunks.

The head turns [B, T, D] hidden states into [B, T, V] logits; at V = 129,280 and T = 128K one
sequence's float32 logits are 66 GB, and autograd would keep them (and the softmax) for the
backward. `head_cross_entropy(..., chunk_tokens=n)` computes the same mean instead over chunks
of n tokens, each under `torch.utils.checkpoint`: a chunk's logits exist only while its own sum
is computed, in the forward and again when the backward recomputes it, so at most one chunk's
[n, V] logits (and their gradient) are alive at a time. The head is token-wise (RMSNorm, then a
linear map), so chunking over tokens changes only the summation order (the test holds it to
1e-6 of the whole-sequence loss and gradients).

Shapes: B batch, T sequence, D hidden, V vocabulary, N = B*T tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean token cross entropy in float32, ignoring IGNORE_INDEX labels."""
    return F.cross_entropy(
        logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), labels_BT.reshape(-1), ignore_index=IGNORE_INDEX
    )


def _summed_cross_entropy(head: Callable[[torch.Tensor], torch.Tensor], h_ND: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h_ND).float(), labels_N, ignore_index=IGNORE_INDEX, reduction="sum")


def head_cross_entropy(
    head: Callable[[torch.Tensor], torch.Tensor], h_BTD: torch.Tensor, labels_BT: torch.Tensor, *, chunk_tokens: int = 0,
    denominator: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean CE of `head(h_BTD)` against `labels_BT`; `chunk_tokens` > 0: in chunks of that many
    tokens, each recomputed in the backward (see the module docstring); 0: the whole at once.
    `denominator`: the summed CE divided by this count instead (a piece of a sequence whose
    label count is the whole sequence's: context parallel)."""
    N = labels_BT.numel()
    if denominator is not None:
        h_ND, labels_N = h_BTD.reshape(N, h_BTD.shape[-1]), labels_BT.reshape(N)
        step = max(N, 1) if chunk_tokens <= 0 else chunk_tokens  # N = 0: a rank without rows adds 0
        total = h_ND.new_zeros((), dtype=torch.float32)
        for lo in range(0, N, step):
            piece = (h_ND[lo : lo + step], labels_N[lo : lo + step])
            total = total + (_summed_cross_entropy(head, *piece) if step >= N else
                             checkpoint(_summed_cross_entropy, head, *piece, use_reentrant=False))
        return total / denominator
    if chunk_tokens <= 0 or N <= chunk_tokens:
        return cross_entropy(head(h_BTD), labels_BT)
    h_ND = h_BTD.reshape(N, h_BTD.shape[-1])
    labels_N = labels_BT.reshape(N)
    total = h_ND.new_zeros((), dtype=torch.float32)
    for lo in range(0, N, chunk_tokens):
        total = total + checkpoint(
            _summed_cross_entropy, head, h_ND[lo : lo + chunk_tokens], labels_N[lo : lo + chunk_tokens],
            use_reentrant=False,
        )
    # F.cross_entropy's mean: over the labelled tokens (0/0 = nan when there are none, as it gives)
    return total / (labels_N != IGNORE_INDEX).sum().float()
