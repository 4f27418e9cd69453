"""The DeepSeek-V3 language model, single-device and top to bottom.

    tokens -> embed_tokens -> layers[0..L) -> norm -> lm_head -> logits
                                  |
                                  +-> MTP modules 1..D (share embed_tokens and lm_head)

Layers live in a string-keyed `ModuleDict` ("0", "1", ...) so parameter names stay stable
when a pipeline stage deletes the layers it does not own (torchtitan's habit); `embed_tokens`,
`norm`, `lm_head` and `mtp` may likewise be None on stages that do not hold them. Parallelism
is applied from outside (`megads.parallel`), never inside this file.

Loss (DeepSeek-V3 §2.2): L = L_main + lambda/D * sum_k L_MTP_k + sum_layers L_balance, where
lambda (`mtp_weight`) is a training-schedule quantity passed in per call.

Shapes: B batch, T sequence, D hidden, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from megads.model.block import RopeCache, TransformerBlock
from megads.model.config import ModelConfig
from megads.model.init import init_parameters
from megads.model.linear import Linear, LinearFactory
from megads.model.loss import cross_entropy, head_cross_entropy
from megads.model.mtp import MTPModule
from megads.model.norm import RMSNorm
from megads.model.rope import RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V] next-token logits (HF's CausalLMOutput.logits)
    hidden_states: torch.Tensor  # [B, T, D] last layer output before the final norm (input of MTP depth 1)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: [B, T-k, V]
    balance_loss: torch.Tensor | None = None  # summed over MoE layers (and MTP blocks)


@dataclass
class LossOutput:
    total: torch.Tensor  # what backward runs on
    lm: torch.Tensor  # main next-token cross entropy (detached)
    mtp: torch.Tensor  # mean over depths of the MTP cross entropies (detached; 0 without MTP)
    balance: torch.Tensor  # sequence-wise balance loss, summed over layers (detached)


def draw_init_seed(generator: torch.Generator | None = None) -> int:
    """The seed of `megads.model.init` a model built now takes from torch's (or `generator`'s) RNG."""
    return int(torch.randint(0, 2**62, (1,), generator=generator, device="cpu"))


class DeepseekV3(nn.Module):
    """`init_seed` None: drawn from torch's global RNG (`torch.manual_seed(s); DeepseekV3(cfg)` is
    reproducible); built on the meta device, nothing is initialised (see megads.model.init)."""

    def __init__(self, cfg: ModelConfig, *, factory: LinearFactory | None = None, init_seed: int | None = None) -> None:
        super().__init__()
        cfg.validate()
        factory = factory or LinearFactory()
        self.cfg = cfg
        self.init_seed = draw_init_seed() if init_seed is None else init_seed
        # `_weight`: no default init here (init_weights draws every value); on the meta device
        # nn.Embedding's own normal_ would import torch._dynamo, about 1.3 s of every process start
        self.embed_tokens: nn.Embedding | None = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(cfg, layer_idx=i, factory=factory) for i in range(cfg.num_hidden_layers)}
        )
        self.norm: RMSNorm | None = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        # the output head stays in high precision under FP8 (as the embedding): not the factory's
        self.lm_head: nn.Module | None = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp: nn.ModuleDict | None = nn.ModuleDict(
            {str(k): MTPModule(cfg, depth=k + 1, factory=factory) for k in range(cfg.num_nextn_predict_layers)}
        )
        self.rotary = RotaryEmbedding(cfg)
        # > 0: the LM and MTP cross entropies in chunks of this many tokens (megads.model.loss);
        # an execution setting, not architecture (set from the trainer's memory.loss_chunk_tokens)
        self.loss_chunk_tokens = 0
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self, *, std: float | None = None) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zero biases/expert bias;
        each tensor from its own generator (seed, name), so any pruned/sharded copy draws the same."""
        init_parameters(self, seed=self.init_seed, std=self.cfg.initializer_range if std is None else std)

    # ------------------------------------------------------------- pieces
    def rope(self, seq_len: int, *, device: torch.device, dtype: torch.dtype) -> RopeCache:
        return self.rotary(torch.arange(seq_len, device=device), dtype=dtype)

    def embed(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        assert self.embed_tokens is not None, "this stage holds no embedding"
        return self.embed_tokens(input_ids_BT)

    def run_layers(self, h_BTD: torch.Tensor, rope: RopeCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Run every layer this module holds, in order; returns (hidden, summed balance loss)."""
        balance = h_BTD.new_zeros((), dtype=torch.float32)
        for block in self.layers.values():
            h_BTD, b = block(h_BTD, rope)
            balance = balance + b
        return h_BTD, balance

    def head(self, h_BTD: torch.Tensor) -> torch.Tensor:
        assert self.norm is not None and self.lm_head is not None, "this stage holds no output head"
        return self.lm_head(self.norm(h_BTD))

    def mtp_depths(self, seq_len: int) -> list[tuple[int, MTPModule]]:
        """(depth k, module) of every MTP depth a sequence of `seq_len` tokens reaches (T - k > 0)."""
        if not self.mtp:
            return []
        return [(k, m) for k, m in enumerate(self.mtp.values(), start=1) if seq_len - k > 0]  # type: ignore[misc]

    def mtp_input(
        self, module: MTPModule, depth: int, h_BTD: torch.Tensor, input_ids_BT: torch.Tensor, rope: RopeCache
    ) -> tuple[torch.Tensor, RopeCache]:
        """Input of depth k's block, [B, T-k, D], and the rope of its T-k positions."""
        assert self.embed_tokens is not None
        assert rope.shard is None, "a sequence split over ranks takes megads.parallel.context_parallel's MTP input"
        T = input_ids_BT.shape[1]
        emb_BTD = self.embed_tokens(input_ids_BT[:, depth:])
        rope_k = RopeCache(rope.cos_TR[: T - depth], rope.sin_TR[: T - depth])
        return module.project(h_BTD[:, : T - depth], emb_BTD), rope_k

    def mtp_head(self, module: MTPModule, h_BTD: torch.Tensor) -> torch.Tensor:
        """Depth k's logits from its block output (the shared output head)."""
        assert self.lm_head is not None
        return self.lm_head(module.norm(h_BTD))

    def mtp_forward(
        self, h_BTD: torch.Tensor, input_ids_BT: torch.Tensor, rope: RopeCache
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """MTP logits for depths 1..D (depth k: [B, T-k, V]) and their summed balance loss."""
        logits: list[torch.Tensor] = []
        balance = h_BTD.new_zeros((), dtype=torch.float32)
        for k, module in self.mtp_depths(input_ids_BT.shape[1]):
            x_BTD, rope_k = self.mtp_input(module, k, h_BTD, input_ids_BT, rope)
            h_BTD, b = module.block(x_BTD, rope_k)
            logits.append(self.mtp_head(module, h_BTD))
            balance = balance + b
        return logits, balance

    # ------------------------------------------------------------- whole model
    def forward(self, input_ids_BT: torch.Tensor, *, with_mtp: bool = True) -> ModelOutput:
        B, T = input_ids_BT.shape
        h_BTD = self.embed(input_ids_BT)
        rope = self.rope(T, device=h_BTD.device, dtype=h_BTD.dtype)
        h_BTD, balance = self.run_layers(h_BTD, rope)
        logits_BTV = self.head(h_BTD)
        mtp_logits: list[torch.Tensor] = []
        if with_mtp:
            mtp_logits, mtp_balance = self.mtp_forward(h_BTD, input_ids_BT, rope)
            balance = balance + mtp_balance
        return ModelOutput(logits=logits_BTV, hidden_states=h_BTD, mtp_logits=mtp_logits, balance_loss=balance)

    def compute_loss(self, input_ids_BT: torch.Tensor, labels_BT: torch.Tensor, *, mtp_weight: float) -> LossOutput:
        """The training loss, without materialising logits beyond `loss_chunk_tokens` at a time
        when that is set (the same numbers as `loss_from_output(self(...))` otherwise)."""
        T = input_ids_BT.shape[1]
        h_BTD = self.embed(input_ids_BT)
        rope = self.rope(T, device=h_BTD.device, dtype=h_BTD.dtype)
        h_BTD, balance = self.run_layers(h_BTD, rope)
        n = self.loss_chunk_tokens
        lm = head_cross_entropy(self.head, h_BTD, labels_BT, chunk_tokens=n)
        mtp_ce: list[torch.Tensor] = []
        if mtp_weight > 0 and self.mtp:
            mtp_balance = h_BTD.new_zeros((), dtype=torch.float32)
            for k, module in self.mtp_depths(T):
                x_BTD, rope_k = self.mtp_input(module, k, h_BTD, input_ids_BT, rope)
                h_BTD, b = module.block(x_BTD, rope_k)
                mtp_ce.append(head_cross_entropy(partial(self.mtp_head, module), h_BTD, labels_BT[:, k:], chunk_tokens=n))
                mtp_balance = mtp_balance + b
            balance = balance + mtp_balance
        return total_loss(lm=lm, mtp_ce=mtp_ce, balance=balance, mtp_weight=mtp_weight)


def total_loss(
    *, lm: torch.Tensor, mtp_ce: Sequence[torch.Tensor], balance: torch.Tensor, mtp_weight: float
) -> LossOutput:
    """L = CE + lambda * mean_k CE_k + balance (lambda/D * sum_k = lambda * mean_k); the one place
    the loss is assembled (the model, the pipeline stage and the tests use it).

    `mtp_ce` holds the cross entropy of each MTP depth that ran (targets y[:, k:]).
    """
    mtp = torch.stack(list(mtp_ce)).mean() if mtp_ce else lm.new_zeros(())
    total = lm + balance
    if mtp_ce and mtp_weight > 0:
        total = total + mtp_weight * mtp
    return LossOutput(total=total, lm=lm.detach(), mtp=mtp.detach(), balance=balance.detach())


def loss_from_output(out: ModelOutput, labels_BT: torch.Tensor, *, mtp_weight: float) -> LossOutput:
    lm = cross_entropy(out.logits, labels_BT)
    mtp_ce = [cross_entropy(lg, labels_BT[:, k:]) for k, lg in enumerate(out.mtp_logits, start=1)]
    balance = out.balance_loss if out.balance_loss is not None else lm.new_zeros(())
    return total_loss(lm=lm, mtp_ce=mtp_ce, balance=balance, mtp_weight=mtp_weight)
