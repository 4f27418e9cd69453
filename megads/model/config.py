"""Model configuration for DeepSeek-V3-class models.

Field names follow `transformers`' `DeepseekV3Config` (and the public `config.json` of
deepseek-ai/DeepSeek-V3), so a Hugging Face config maps onto this dataclass one to one.
The few fields that only training needs (the sequence-wise balance-loss weight) are
grouped at the end and say so.

This dataclass is registered as a Hydra structured config (group `model`), so a typo in a
key fails at start-up; `validate()` checks the relations between fields and says what to
change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RopeScalingConfig:
    """YaRN context extension (the `rope_scaling` block of the public config.json).

    `type: none` means no scaling: `ModelConfig` turns it into `rope_scaling=None`. The Hydra
    presets hold that form rather than `null` because OmegaConf cannot merge a command-line dict
    (`model.rope_scaling={type:yarn,factor:4.0,...}`) into a null node; into `{type: none}` it
    merges, field by field (`model.rope_scaling.type=yarn model.rope_scaling.factor=4`) too, and a
    key that is not a field below is refused by name.
    """

    type: str = "yarn"  # yarn | none
    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture hyper-parameters (HF `DeepseekV3Config` names)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    # None = direct query projection (DeepSeek-V2-Lite); otherwise the query LoRA rank.
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.006
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None (or type "none", the presets' mergeable form) = plain RoPE; see RopeScalingConfig
    rope_scaling: RopeScalingConfig | None = field(default_factory=lambda: RopeScalingConfig(type="none"))
    # Layout of the rope rows in Hugging Face checkpoints (interleaved pairs). Our model always
    # computes with the half-split layout; conversion permutes rows when this is true.
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    # --- training-only fields (not part of the HF config) ---
    # Weight alpha of the complementary sequence-wise balance loss (SPEC: 1e-4).
    seq_aux_loss_alpha: float = 1e-4

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        if self.rope_scaling is not None and self.rope_scaling.type == "none":
            self.rope_scaling = None

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layer `layer_idx` uses DeepSeekMoE (else the dense SwiGLU MLP)."""
        return layer_idx >= self.first_k_dense_replace and self.n_routed_experts > 0

    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(s, mscale_all_dim)^2 when YaRN is active."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale = scale * m * m
        return scale

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ValueError naming the clashing fields and what would fit."""
        errors: list[str] = []
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                errors.append(f"model.{name}={getattr(self, name)} must be > 0")
        if self.qk_rope_head_dim % 2:
            errors.append(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (rotary pairs)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            errors.append(f"model.q_lora_rank={self.q_lora_rank} must be > 0 or null (direct query projection)")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            errors.append(
                f"model.first_k_dense_replace={self.first_k_dense_replace} must lie in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        if self.num_moe_layers > 0 and self.n_routed_experts > 0:
            if self.moe_intermediate_size <= 0:
                errors.append(f"model.moe_intermediate_size={self.moe_intermediate_size} must be > 0")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                errors.append(
                    f"model.n_routed_experts={self.n_routed_experts} must split evenly into "
                    f"n_group={self.n_group} groups; pick n_group among the divisors of n_routed_experts"
                )
            elif not 1 <= self.topk_group <= self.n_group:
                errors.append(f"model.topk_group={self.topk_group} must lie in [1, n_group={self.n_group}]")
            else:
                per_group = self.n_routed_experts // self.n_group
                reachable = self.topk_group * per_group
                if not 1 <= self.num_experts_per_tok <= reachable:
                    errors.append(
                        f"model.num_experts_per_tok={self.num_experts_per_tok} must lie in [1, "
                        f"topk_group*experts_per_group={reachable}]"
                    )
                if per_group < 2:
                    errors.append(
                        f"model.n_group={self.n_group} leaves {per_group} expert per group; group scores "
                        "sum the top-2 experts of a group, so use at most n_routed_experts/2 groups"
                    )
        if self.scoring_func != "sigmoid":
            errors.append(f"model.scoring_func={self.scoring_func!r}: only 'sigmoid' (DeepSeek-V3) is supported")
        if self.topk_method != "noaux_tc":
            errors.append(
                f"model.topk_method={self.topk_method!r}: only 'noaux_tc' (DeepSeek-V3's group-limited top-k "
                "with the auxiliary-loss-free bias) is implemented"
            )
        if self.hidden_act != "silu":
            errors.append(f"model.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.num_nextn_predict_layers < 0:
            errors.append(f"model.num_nextn_predict_layers={self.num_nextn_predict_layers} must be >= 0")
        rs = self.rope_scaling
        if rs is not None:
            if rs.type != "yarn":
                errors.append(f"model.rope_scaling.type={rs.type!r}: only 'yarn' is supported (or 'none' / null: plain RoPE)")
            if rs.factor < 1.0:
                errors.append(f"model.rope_scaling.factor={rs.factor} must be >= 1")
        if errors:
            raise ValueError("invalid model config:\n  - " + "\n  - ".join(errors))

    # ------------------------------------------------------------ HF interop
    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a public DeepSeek-V3 `config.json` dict (`rope_scaling` form)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "seq_aux_loss_alpha"}
        out["rope_scaling"] = dataclasses.asdict(self.rope_scaling) if self.rope_scaling is not None else None
        out["model_type"] = "deepseek_v3"
        out["architectures"] = ["DeepseekV3ForCausalLM"]
        out["num_key_value_heads"] = self.num_attention_heads
        return out

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        """Build from a HF config dict (either `rope_scaling` or transformers>=5 `rope_parameters`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf.items() if k in known and k not in ("rope_scaling",)}
        rope = hf.get("rope_scaling")
        params = hf.get("rope_parameters")
        if params:
            kwargs.setdefault("rope_theta", params.get("rope_theta", hf.get("rope_theta", 10000.0)))
            if params.get("rope_type", params.get("type", "default")) != "default":
                rope = params
        if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
            kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if rope and rope.get("rope_type", rope.get("type")) not in (None, "default"):
            rope_type = rope.get("rope_type", rope.get("type"))
            if rope_type != "yarn":
                raise ValueError(f"{source}: rope scaling type {rope_type!r} is not supported (only 'yarn')")
            rs = RopeScalingConfig(
                type="yarn",
                factor=float(rope["factor"]),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
                ),
                beta_fast=float(rope.get("beta_fast") or 32.0),
                beta_slow=float(rope.get("beta_slow") or 1.0),
                mscale=float(rope.get("mscale") or 0.0),
                mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0),
            )
            kwargs["rope_scaling"] = rs
        else:
            kwargs["rope_scaling"] = None
        for key in ("q_lora_rank",):
            if key in hf:
                kwargs[key] = hf[key]
        # HF allows null for some ints that we require.
        for key, default in (("n_group", 1), ("topk_group", 1), ("first_k_dense_replace", 0)):
            if kwargs.get(key) is None:
                kwargs[key] = default
        # num_key_value_heads is ignored: MLA expands keys/values to every query head itself.
        cfg = cls(**kwargs)
        try:
            cfg.validate()
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        return cfg

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 when s <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


@dataclass
class ParamCount:
    """Parameter counts of a configuration (computed analytically, no allocation)."""

    total: int  # main model, embedding and output head included
    activated: int  # per token: one embedding row, the dense parts, shared + top-k routed experts, head
    mtp: int  # MTP modules without the embedding/head they share with the main model
    mtp_stored: int  # MTP as stored in the public checkpoint (its own copies of embedding and head)
    embedding: int
    per_layer: list[int] = field(default_factory=list)


def count_parameters(cfg: ModelConfig) -> ParamCount:
    """Total and activated-per-token parameters of the main model; MTP counted separately.

    "Activated" counts what one token touches: a single embedding row (a lookup, not the whole
    table), attention, the dense or shared+top-k routed experts and gate, norms and the output
    head. For the 671B preset this gives 36.63B (the report's rounded "37B"); counting the whole
    embedding table would give 37.55B. See docs/model.md.
    """
    h = cfg.hidden_size
    n_heads = cfg.num_attention_heads

    def attn() -> int:
        if cfg.q_lora_rank is None:
            q = h * n_heads * cfg.qk_head_dim
        else:
            q = h * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * n_heads * cfg.qk_head_dim
        kv = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
        kv += cfg.kv_lora_rank * n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
        o = n_heads * cfg.v_head_dim * h
        return q + kv + o

    dense_mlp = 3 * h * cfg.intermediate_size
    expert = 3 * h * cfg.moe_intermediate_size
    gate = cfg.n_routed_experts * h
    norms = 2 * h

    def layer(idx: int) -> tuple[int, int]:
        a = attn() + norms
        if cfg.is_moe_layer(idx):
            shared = cfg.n_shared_experts * expert
            total = a + gate + shared + cfg.n_routed_experts * expert
            active = a + gate + shared + cfg.num_experts_per_tok * expert
            return total, active
        return a + dense_mlp, a + dense_mlp

    per_layer = [layer(i) for i in range(cfg.num_hidden_layers)]
    emb = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    total = sum(t for t, _ in per_layer) + emb + head + h
    active = sum(a for _, a in per_layer) + h + head + h
    # MTP module: enorm, hnorm, eh_proj (2h -> h), one MoE transformer block, final norm;
    # embedding and head are shared with the main model.
    mtp_block, _ = layer(cfg.num_hidden_layers)
    mtp = cfg.num_nextn_predict_layers * (2 * h + 2 * h * h + mtp_block + h)
    mtp_stored = mtp + cfg.num_nextn_predict_layers * (emb + cfg.vocab_size * h)
    return ParamCount(
        total=total, activated=active, mtp=mtp, mtp_stored=mtp_stored, embedding=emb,
        per_layer=[t for t, _ in per_layer],
    )
