"""Hugging Face <-> megads checkpoint conversion for DeepSeek-V3.

ONE table (`PARAM_TABLE`) maps every Hugging Face tensor name inside a decoder layer to our
name, with the row permutation it needs and the dimension along which expert parallel shards
it. Everything else (prefixes, MTP layers, expert stacking) is derived from the table by the
two walkers `hf_to_megads` / `megads_to_hf`.

Layout facts handled here (SPEC.md):
- RoPE rows: the public checkpoint stores the rope rows of `q_b_proj`/`q_proj` (per head) and
  `kv_a_proj_with_mqa` (its last qk_rope_head_dim rows) in DeepSeek's interleaved pair order.
  Our model rotates half-split, so import permutes those rows with [0,2,4,..,1,3,5,..] and
  export applies the inverse. This happens only when `config.rope_interleave` is true.
- Routed experts: HF stores `mlp.experts.{e}.{gate,up,down}_proj.weight`; we stack them into
  `mlp.experts.gate_up_proj.weight` [E, 2I, D] (gate rows first) and `down_proj.weight`
  [E, D, I]. transformers>=5's fused names (`mlp.experts.gate_up_proj`) are accepted on import.
- MTP: module k lives at `model.layers.{num_hidden_layers + k}` with `enorm`, `hnorm`,
  `eh_proj`, the usual block tensors, `shared_head.norm`, and copies of the shared
  `embed_tokens` and `shared_head.head` (= lm_head). Import checks the copies equal the main
  model's tensors; export writes them.
- FP8: a weight with a `weight_scale_inv` companion (one float32 per 128x128 block) is
  dequantised on import: w = fp8 * scale_inv (block-wise).

Bad input (missing shard, shape mismatch, unknown or missing tensor, config mismatch) raises
`CheckpointError` naming the tensor and the file. Writes are atomic: files go to a temporary
folder beside the destination and are moved in only when complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megads.convert.atomic import atomic_folder
from megads.model.config import ModelConfig
from megads.model.rope import interleaved_to_half_split
from megads.model.transformer import DeepseekV3

FP8_BLOCK = 128


class CheckpointError(ValueError):
    """A checkpoint is not what the config says it should be."""


@dataclass(frozen=True)
class ParamSpec:
    """How one HF tensor inside a decoder layer maps to ours.

    hf: name after `model.layers.{i}.`; ours: name after `layers.{i}.` ("{e}" = expert index);
    rope: "q" (per-head rope rows), "kv" (trailing rope rows) or None;
    expert: for routed experts, which slice of the stacked tensor ("gate", "up", "down");
    ep_shard_dim: dimension of OUR tensor that expert parallel shards (None = replicated).
    """

    hf: str
    ours: str
    rope: str | None = None
    expert: str | None = None
    ep_shard_dim: int | None = None


PARAM_TABLE: tuple[ParamSpec, ...] = (
    ParamSpec("input_layernorm.weight", "input_layernorm.weight"),
    ParamSpec("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ParamSpec("self_attn.q_proj.weight", "self_attn.q_proj.weight", rope="q"),
    ParamSpec("self_attn.q_a_proj.weight", "self_attn.q_a_proj.weight"),
    ParamSpec("self_attn.q_a_proj.bias", "self_attn.q_a_proj.bias"),
    ParamSpec("self_attn.q_a_layernorm.weight", "self_attn.q_a_layernorm.weight"),
    ParamSpec("self_attn.q_b_proj.weight", "self_attn.q_b_proj.weight", rope="q"),
    ParamSpec("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.weight", rope="kv"),
    ParamSpec("self_attn.kv_a_proj_with_mqa.bias", "self_attn.kv_a_proj_with_mqa.bias", rope="kv"),
    ParamSpec("self_attn.kv_a_layernorm.weight", "self_attn.kv_a_layernorm.weight"),
    ParamSpec("self_attn.kv_b_proj.weight", "self_attn.kv_b_proj.weight"),
    ParamSpec("self_attn.o_proj.weight", "self_attn.o_proj.weight"),
    ParamSpec("self_attn.o_proj.bias", "self_attn.o_proj.bias"),
    # dense FFN and shared experts
    ParamSpec("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
    ParamSpec("mlp.up_proj.weight", "mlp.up_proj.weight"),
    ParamSpec("mlp.down_proj.weight", "mlp.down_proj.weight"),
    ParamSpec("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.gate_proj.weight"),
    ParamSpec("mlp.shared_experts.up_proj.weight", "mlp.shared_experts.up_proj.weight"),
    ParamSpec("mlp.shared_experts.down_proj.weight", "mlp.shared_experts.down_proj.weight"),
    # router
    ParamSpec("mlp.gate.weight", "mlp.gate.weight"),
    ParamSpec("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),
    # routed experts (per-expert HF tensors stacked into one of ours)
    ParamSpec("mlp.experts.{e}.gate_proj.weight", "mlp.experts.gate_up_proj.weight", expert="gate", ep_shard_dim=0),
    ParamSpec("mlp.experts.{e}.up_proj.weight", "mlp.experts.gate_up_proj.weight", expert="up", ep_shard_dim=0),
    ParamSpec("mlp.experts.{e}.down_proj.weight", "mlp.experts.down_proj.weight", expert="down", ep_shard_dim=0),
    # transformers>=5 fused layout (import only)
    ParamSpec("mlp.experts.gate_up_proj", "mlp.experts.gate_up_proj.weight", expert="fused", ep_shard_dim=0),
    ParamSpec("mlp.experts.down_proj", "mlp.experts.down_proj.weight", expert="fused", ep_shard_dim=0),
)

# Outside the decoder layers.
TOP_LEVEL = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
# MTP-only tensors, relative to `model.layers.{L+k}.` -> relative to `mtp.{k}.`
MTP_ONLY = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "shared_head.norm.weight": "norm.weight"}
# MTP copies of shared tensors -> the main model's name
MTP_SHARED = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


# --------------------------------------------------------------------------- rope rows
def _rope_perm(cfg: ModelConfig, kind: str, rows: int, *, inverse: bool) -> torch.Tensor:
    perm_R = interleaved_to_half_split(cfg.qk_rope_head_dim)
    if inverse:
        perm_R = torch.argsort(perm_R)
    idx = torch.arange(rows)
    if kind == "q":  # per head: [nope rows | rope rows]
        head = cfg.qk_head_dim
        idx = idx.view(-1, head).clone()
        idx[:, cfg.qk_nope_head_dim:] = idx[:, cfg.qk_nope_head_dim:][:, perm_R]
        return idx.reshape(-1)
    start = cfg.kv_lora_rank  # kv: [kv_lora_rank rows | rope rows]
    idx = idx.clone()
    idx[start:] = idx[start:][perm_R]
    return idx


def _permute_rope(t: torch.Tensor, cfg: ModelConfig, kind: str | None, *, inverse: bool) -> torch.Tensor:
    if kind is None or not cfg.rope_interleave:
        return t
    return t.index_select(0, _rope_perm(cfg, kind, t.shape[0], inverse=inverse))


def _expert_rows(part: str | None, inter: int) -> slice:
    """Rows of one expert's slice of our stacked tensor that hold the HF tensor `part`."""
    return {"gate": slice(0, inter), "up": slice(inter, 2 * inter)}.get(part or "", slice(None))


# --------------------------------------------------------------------------- FP8
def dequantize_fp8_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor, *, block: int = FP8_BLOCK) -> torch.Tensor:
    """float32 weight = fp8 weight * scale_inv, one scale per block x block tile."""
    rows, cols = w_fp8.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return w_fp8.float() * s


def quantize_fp8_blockwise(w: torch.Tensor, *, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise E4M3 quantisation (the public checkpoints' format): returns (fp8, scale_inv)."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    rows, cols = w.shape
    rb, cb = -(-rows // block), -(-cols // block)
    padded = w.float().new_zeros(rb * block, cb * block)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(rb, block, cb, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / fp8_max  # per tile
    q = (tiles / scale_inv[:, None, :, None]).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
    return q.view(rb * block, cb * block)[:rows, :cols].contiguous(), scale_inv.float()


# --------------------------------------------------------------------------- reading
def read_hf_config(path: str | os.PathLike[str]) -> ModelConfig:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not found; a Hugging Face checkpoint folder needs config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if hf.get("model_type") not in (None, "deepseek_v3", "deepseek_v2"):
        raise CheckpointError(f"{cfg_file}: model_type={hf.get('model_type')!r}, expected 'deepseek_v3'")
    return ModelConfig.from_hf_dict(hf, source=str(cfg_file))


def _shard_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or the single-file layout."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = {f: path / f for f in set(weight_map.values())}
        for f, p in files.items():
            if not p.is_file():
                owners = sorted(k for k, v in weight_map.items() if v == f)
                raise CheckpointError(
                    f"{index}: shard {f} is missing (it holds {len(owners)} tensors, e.g. {owners[0]}); "
                    "copy the complete checkpoint"
                )
        return {k: files[v] for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


def iter_hf_tensors(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Yield (name, tensor, file) for every tensor, FP8 weights dequantised to float32."""
    path = Path(path)
    by_file: dict[Path, list[str]] = {}
    for name, file in _shard_files(path).items():
        by_file.setdefault(file, []).append(name)
    for file, names in sorted(by_file.items()):
        with safe_open(str(file), "pt") as f:
            present = set(f.keys())
            for name in sorted(names):
                if name.endswith("weight_scale_inv"):
                    continue
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name} is listed in the index but absent from the file")
                t = f.get_tensor(name)
                if t.dtype == torch.float8_e4m3fn:
                    scale_name = name + "_scale_inv"
                    if scale_name not in present:
                        raise CheckpointError(f"{file}: FP8 tensor {name} has no {scale_name} in the same file")
                    t = dequantize_fp8_blockwise(t, f.get_tensor(scale_name))
                yield name, t, file


# --------------------------------------------------------------------------- name mapping
@dataclass(frozen=True)
class Target:
    ours: str  # full name in our state dict
    spec: ParamSpec | None = None
    expert: int | None = None  # for per-expert HF tensors
    shared_copy: bool = False  # MTP copy of embed/head: checked, not stored


def hf_to_megads(name: str, cfg: ModelConfig) -> Target | None:
    """Map one HF tensor name to our name (None if the name is not part of the layout)."""
    if name in TOP_LEVEL:
        return Target(TOP_LEVEL[name])
    m = _LAYER_RE.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    L = cfg.num_hidden_layers
    if layer >= L:
        k = layer - L
        if k >= cfg.num_nextn_predict_layers:
            return None
        if rest in MTP_ONLY:
            return Target(f"mtp.{k}.{MTP_ONLY[rest]}")
        if rest in MTP_SHARED:
            return Target(MTP_SHARED[rest], shared_copy=True)
        prefix = f"mtp.{k}.block."
    else:
        prefix = f"layers.{layer}."
    em = _EXPERT_RE.match(rest)
    if em:
        expert, which = int(em.group(1)), em.group(2)
        for spec in PARAM_TABLE:
            if spec.expert == which.removesuffix("_proj"):
                return Target(prefix + spec.ours, spec=spec, expert=expert)
    for spec in PARAM_TABLE:
        if spec.hf == rest and "{e}" not in spec.hf:
            return Target(prefix + spec.ours, spec=spec)
    return None


def megads_to_hf(ours: str, cfg: ModelConfig) -> list[tuple[str, ParamSpec | None, int | None]]:
    """HF names for one of our tensors: [(hf name, spec, expert index or None)]."""
    for hf, o in TOP_LEVEL.items():
        if o == ours:
            return [(hf, None, None)]
    L = cfg.num_hidden_layers
    m = re.match(r"^mtp\.(\d+)\.(.+)$", ours)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        hf_prefix = f"model.layers.{L + k}."
        for hf_rest, o in MTP_ONLY.items():
            if o == rest:
                return [(hf_prefix + hf_rest, None, None)]
        if not rest.startswith("block."):
            raise KeyError(ours)
        rest = rest.removeprefix("block.")
    else:
        m = re.match(r"^layers\.(\d+)\.(.+)$", ours)
        if not m:
            raise KeyError(ours)
        hf_prefix, rest = f"model.layers.{m.group(1)}.", m.group(2)
    out: list[tuple[str, ParamSpec | None, int | None]] = []
    for spec in PARAM_TABLE:
        if spec.ours != rest or spec.expert == "fused":
            continue
        if spec.expert is None:
            return [(hf_prefix + spec.hf, spec, None)]
        for e in range(cfg.n_routed_experts):
            out.append((hf_prefix + spec.hf.format(e=e), spec, e))
    if not out:
        raise KeyError(ours)
    return out


# --------------------------------------------------------------------------- import
def _check_config(expected: ModelConfig | None, found: ModelConfig, source: str) -> ModelConfig:
    if expected is None:
        return found
    arch_fields = [
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank", "q_lora_rank",
        "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "first_k_dense_replace",
    ]
    for name in arch_fields:
        if getattr(expected, name) != getattr(found, name):
            raise CheckpointError(
                f"{source}: {name}={getattr(found, name)} but the requested model config has "
                f"{name}={getattr(expected, name)}; load without a config or fix the config"
            )
    return expected


def load_hf_state_dict(path: str | os.PathLike[str], cfg: ModelConfig, model: DeepseekV3) -> None:
    """Fill `model` (built from `cfg`) from the HF checkpoint folder `path`, checking everything."""
    state = model.state_dict()
    filled: set[str] = set()  # repr of (our name[, expert, part]) already written
    shared_copies: list[tuple[str, torch.Tensor, Path]] = []
    with torch.no_grad():
        for name, t, file in iter_hf_tensors(path):
            target = hf_to_megads(name, cfg)
            if target is None:
                raise CheckpointError(
                    f"{file}: unknown tensor {name} (not part of a DeepSeek-V3 checkpoint with "
                    f"num_hidden_layers={cfg.num_hidden_layers}, num_nextn_predict_layers={cfg.num_nextn_predict_layers})"
                )
            if target.shared_copy:
                shared_copies.append((target.ours, t, file))
                continue
            if target.ours not in state:
                raise CheckpointError(f"{file}: tensor {name} maps to {target.ours}, which this model config lacks")
            dest = state[target.ours]
            spec = target.spec
            if spec is not None and spec.rope is not None:
                t = _permute_rope(t, cfg, spec.rope, inverse=False)
            if target.expert is not None:
                assert spec is not None
                e = target.expert
                if e >= dest.shape[0]:
                    raise CheckpointError(f"{file}: tensor {name}: expert {e} >= n_routed_experts={dest.shape[0]}")
                region = dest[e][_expert_rows(spec.expert, cfg.moe_intermediate_size)]
                key = (target.ours, e, spec.expert)
            else:
                region = dest
                key = (target.ours,)
            if tuple(region.shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{file}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(region.shape)} "
                    f"for {target.ours} under the given config"
                )
            region.copy_(t.to(region.dtype))
            filled.add(repr(key))
            if spec is not None and spec.expert == "fused":
                for e in range(dest.shape[0]):
                    for part in ("gate", "up") if "gate_up" in target.ours else ("down",):
                        filled.add(repr((target.ours, e, part)))
    # what should have been filled
    missing: list[str] = []
    for ours in state:
        if ours.endswith("tokens_per_expert") or ours.startswith("rotary."):
            continue
        for hf_name, spec, e in megads_to_hf(ours, cfg):
            key = (ours, e, spec.expert) if e is not None and spec is not None else (ours,)
            if repr(key) not in filled:
                missing.append(hf_name)
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} tensors missing, e.g. {', '.join(missing[:5])}"
            + (" (MTP layers: pass init_missing_mtp=True to start them fresh)" if any(
                int(_LAYER_RE.match(n).group(1)) >= cfg.num_hidden_layers for n in missing if _LAYER_RE.match(n)) else "")
        )
    for ours, t, file in shared_copies:
        if not torch.equal(state[ours].float(), t.float()):
            raise CheckpointError(
                f"{file}: the MTP copy of {ours} differs from the main model's; megads shares embedding "
                "and head with MTP (SPEC.md), so such a checkpoint cannot be represented"
            )


def from_hf(
    path: str | os.PathLike[str],
    *,
    config: ModelConfig | None = None,
    init_missing_mtp: bool = False,
    dtype: torch.dtype = torch.float32,
) -> DeepseekV3:
    """Build a megads `DeepseekV3` from a Hugging Face DeepSeek-V3 checkpoint folder.

    `init_missing_mtp=True` accepts a checkpoint without MTP layers (e.g. one written by
    transformers, whose model has none) and keeps freshly initialised MTP modules.
    """
    found = read_hf_config(path)
    cfg = _check_config(config, found, str(Path(path) / "config.json"))
    model = DeepseekV3(cfg).to(dtype)
    try:
        load_hf_state_dict(path, cfg, model)
    except CheckpointError as e:
        has_mtp_gap = "MTP layers" in str(e)
        if not (init_missing_mtp and has_mtp_gap):
            raise
        fresh = DeepseekV3(cfg.replace(num_nextn_predict_layers=0)).to(dtype)
        load_hf_state_dict(path, fresh.cfg, fresh)
        missing = set(model.state_dict()) - set(fresh.state_dict())
        model.load_state_dict({**fresh.state_dict(), **{k: model.state_dict()[k] for k in missing}})
    return model


# --------------------------------------------------------------------------- export
def hf_state_dict(model: DeepseekV3, *, fp8: bool = False) -> dict[str, torch.Tensor]:
    """Our weights in the public HF layout (per-expert tensors, interleaved rope rows, MTP copies)."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for ours, t in state.items():
        if ours.endswith("tokens_per_expert") or ours.startswith("rotary."):
            continue
        for hf_name, spec, e in megads_to_hf(ours, cfg):
            v = t
            if e is not None and spec is not None:
                v = t[e][_expert_rows(spec.expert, cfg.moe_intermediate_size)]
            if spec is not None and spec.rope is not None:
                v = _permute_rope(v, cfg, spec.rope, inverse=True)
            out[hf_name] = v.contiguous()
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        for hf_rest, ours in MTP_SHARED.items():
            out[prefix + hf_rest] = state[ours].clone()
    if fp8:
        for name in list(out):
            t = out[name]
            # As in the public checkpoints: GEMM weights in FP8; norms, gate, embedding, head in float.
            if (t.dim() == 2 and name.endswith("proj.weight") and "gate.weight" not in name):
                out[name], out[name + "_scale_inv"] = quantize_fp8_blockwise(t)
    return out


def to_hf(
    model: DeepseekV3,
    path: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    fp8: bool = False,
    overwrite: bool = False,
) -> None:
    """Write `model` as a HF checkpoint folder (config.json, sharded safetensors + index), atomically."""
    dst = Path(path)
    with atomic_folder(dst, overwrite=overwrite, error=CheckpointError) as tmp:
        tensors = hf_state_dict(model, fp8=fp8)
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name in sorted(tensors):
            nbytes = tensors[name].numel() * tensors[name].element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += nbytes
        weight_map: dict[str, str] = {}
        n = len(shards)
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        if n > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        hf_cfg = model.cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        if fp8:
            hf_cfg["quantization_config"] = {
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            }
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
