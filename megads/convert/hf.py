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
  dequantised on import: w = fp8 * scale_inv (block-wise), 128 rows at a time.

Both directions go one tensor at a time (`megads.convert.safetensors_io`):
- import: `HFCheckpoint` maps a folder's tensors onto our names from the file headers alone
  (every name, shape and FP8 scale checked before anything is read); `fill` then reads one of
  our tensors, or an expert range of one, straight into the destination.
  `load_hf_weights_into(model, path)` fills any model, also a pipeline stage holding some layers
  and an expert shard, reading only the tensors it holds; `from_hf` is it on a whole model.
- export: `write_hf_folder` walks an `ExportSource` (a model in memory, `ModelSource`, or a DCP
  checkpoint folder, `megads.convert.checkpoint`) in model order, plans every output tensor's
  name, dtype and shape first, and writes each shard as its tensors arrive; `to_hf` is it on a
  model.

Bad input (missing shard, shape mismatch, unknown or missing tensor, config mismatch) raises
`CheckpointError` naming the tensor and the file. Writes are atomic: files go to a temporary
folder beside the destination and are moved in only when complete.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from megads.convert.atomic import atomic_folder
from megads.convert.errors import CheckpointError
from megads.convert.safetensors_io import Planned, ShardWriter, TensorInfo, read, read_header, read_into
from megads.model.config import ModelConfig
from megads.model.rope import interleaved_to_half_split
from megads.model.transformer import DeepseekV3

FP8_BLOCK = 128
_COMPARE_BLOCK = 64 << 20  # bytes of rows compared at once (MTP copies)


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
def dequantize_fp8_blockwise(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, *, block: int = FP8_BLOCK, out: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 weight = fp8 weight * scale_inv, one scale per block x block tile (into `out` if
    given), computed `block` rows at a time: memory beyond the output is one row block."""
    rows, cols = w_fp8.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=torch.float32)
    s_RC = scale_inv.float().repeat_interleave(block, 1)[:, :cols]  # [row blocks, cols]
    for i, r0 in enumerate(range(0, rows, block)):
        torch.mul(w_fp8[r0 : r0 + block].float(), s_RC[i], out=out[r0 : r0 + block])
    return out


def quantize_fp8_blockwise(w: torch.Tensor, *, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise E4M3 quantisation (the public checkpoints' format): returns (fp8, scale_inv),
    one row block at a time."""
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    rows, cols = w.shape
    rb, cb = -(-rows // block), -(-cols // block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(rb, cb, dtype=torch.float32)
    for i in range(rb):
        r0, r1 = i * block, min((i + 1) * block, rows)
        padded = torch.zeros(block, cb * block, dtype=torch.float32)
        padded[: r1 - r0, :cols] = w[r0:r1].float()
        tiles = padded.view(block, cb, block)
        amax = tiles.abs().amax(dim=(0, 2)).clamp(min=1e-12)
        scale_inv[i] = amax / fp8_max  # per tile
        tq = (tiles / scale_inv[i][None, :, None]).clamp(-fp8_max, fp8_max).to(torch.float8_e4m3fn)
        q[r0:r1] = tq.view(block, cb * block)[: r1 - r0, :cols]
    return q, scale_inv


def fp8_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """As in the public checkpoints: GEMM weights in FP8; norms, gate, embedding, head in float."""
    return len(shape) == 2 and name.endswith("proj.weight") and "gate.weight" not in name


def fp8_scale_shape(shape: tuple[int, ...], *, block: int = FP8_BLOCK) -> tuple[int, int]:
    return -(-shape[0] // block), -(-shape[1] // block)


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


def hf_tensor_infos(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """name -> TensorInfo of every tensor of a HF folder (model.safetensors.index.json or the
    single-file layout), from the file headers alone."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable ({e})") from None
        files = {f: path / f for f in set(weight_map.values())}
        for f, p in sorted(files.items()):
            if not p.is_file():
                owners = sorted(k for k, v in weight_map.items() if v == f)
                raise CheckpointError(
                    f"{index}: shard {f} is missing (it holds {len(owners)} tensors, e.g. {owners[0]}); "
                    "copy the complete checkpoint"
                )
        headers = {f: read_header(p) for f, p in files.items()}
        out: dict[str, TensorInfo] = {}
        for name, f in weight_map.items():
            if name not in headers[f]:
                raise CheckpointError(f"{files[f]}: tensor {name} is listed in the index but absent from the file")
            out[name] = headers[f][name]
        return out
    single = path / "model.safetensors"
    if single.is_file():
        return read_header(single)
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json found")


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
EXPERT_TENSORS = frozenset(spec.ours for spec in PARAM_TABLE if spec.ep_shard_dim == 0)


def is_expert_tensor(ours: str) -> bool:
    """Our routed-expert stacks ([E, ...], sharded along dim 0 by expert parallel)."""
    return any(ours.endswith("." + e) for e in EXPERT_TENSORS)


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict names -> global shapes for `cfg` (a meta-device model: nothing allocated)."""
    with torch.device("meta"):
        model = DeepseekV3(cfg, init_seed=0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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


@dataclass(frozen=True)
class Piece:
    """One HF tensor and the part of one of our tensors it fills."""

    info: TensorInfo
    scale: TensorInfo | None  # FP8 weight_scale_inv
    expert: int | None  # global expert index (per-expert HF tensors)
    part: str | None  # "gate", "up", "down" (rows of expert `expert`), "fused" (the whole stack)
    rope: str | None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.scale is not None else self.info.dtype


class HFCheckpoint:
    """A HF checkpoint folder mapped onto our names for `cfg`: which HF tensors fill which of ours.

    Built from the file headers alone; raises CheckpointError for an unknown tensor, a tensor the
    config lacks, a wrong shape or an FP8 tensor without its scale. `fill` reads.
    """

    def __init__(self, path: str | os.PathLike[str], cfg: ModelConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg
        self.shapes = model_shapes(cfg)
        self.pieces: dict[str, list[Piece]] = {}
        self.shared: list[tuple[str, TensorInfo, TensorInfo | None]] = []  # (our main tensor, its MTP copy, scale)
        self._expert_index: dict[str, dict[int | None, list[Piece]]] = {}
        infos = hf_tensor_infos(self.path)
        for name, info in infos.items():
            if name.endswith("weight_scale_inv"):
                continue
            target = hf_to_megads(name, cfg)
            if target is None:
                raise CheckpointError(
                    f"{info.file}: unknown tensor {name} (not part of a DeepSeek-V3 checkpoint with "
                    f"num_hidden_layers={cfg.num_hidden_layers}, num_nextn_predict_layers={cfg.num_nextn_predict_layers})"
                )
            scale = self._scale(info, infos.get(name + "_scale_inv"))
            if target.shared_copy:
                self.shared.append((target.ours, info, scale))
                continue
            if target.ours not in self.shapes:
                raise CheckpointError(f"{info.file}: tensor {name} maps to {target.ours}, which this model config lacks")
            spec = target.spec
            full = self.shapes[target.ours]
            part = spec.expert if spec is not None else None
            if target.expert is not None:
                if target.expert >= full[0]:
                    raise CheckpointError(f"{info.file}: tensor {name}: expert {target.expert} >= n_routed_experts={full[0]}")
                rows = _expert_rows(part, cfg.moe_intermediate_size).indices(full[1])
                expected: tuple[int, ...] = (len(range(*rows)), *full[2:])
            else:
                expected = full
            if info.shape != expected:
                raise CheckpointError(
                    f"{info.file}: tensor {name} has shape {info.shape}, expected {expected} "
                    f"for {target.ours} under the given config"
                )
            if scale is not None and part == "fused":
                raise CheckpointError(f"{info.file}: tensor {name}: FP8 fused expert tensors are not supported")
            rope = spec.rope if spec is not None else None
            self.pieces.setdefault(target.ours, []).append(Piece(info, scale, target.expert, part, rope))

    @staticmethod
    def _scale(info: TensorInfo, scale: TensorInfo | None) -> TensorInfo | None:
        if info.dtype != torch.float8_e4m3fn:
            return None
        if scale is None or scale.file != info.file:
            raise CheckpointError(f"{info.file}: FP8 tensor {info.name} has no {info.name}_scale_inv in the same file")
        if len(info.shape) != 2 or scale.shape != fp8_scale_shape(info.shape):
            raise CheckpointError(f"{info.file}: {scale.name} has shape {scale.shape}, expected "
                                  f"{fp8_scale_shape(info.shape) if len(info.shape) == 2 else '(2-D weights only)'}")
        return scale

    # ------------------------------------------------------------------ what is there
    def stored_dtype(self, ours: str) -> torch.dtype:
        """The dtype our tensor keeps (the HF tensors' own; FP8 dequantised: float32)."""
        dtype = self.pieces[ours][0].dtype
        for p in self.pieces[ours][1:]:
            dtype = torch.promote_types(dtype, p.dtype)
        return dtype

    def missing(self, ours: str, experts: tuple[int, int] | None = None) -> list[str]:
        """HF names absent from the folder that `ours` (its experts [lo, hi)) needs."""
        have = self.pieces.get(ours, [])
        if experts is None:
            return [] if have else [hf for hf, _, _ in megads_to_hf(ours, self.cfg)]
        if any(p.part == "fused" for p in have):
            return []
        got = {(p.expert, p.part) for p in have}
        return [hf for hf, spec, e in megads_to_hf(ours, self.cfg)
                if e is not None and spec is not None and experts[0] <= e < experts[1] and (e, spec.expert) not in got]

    # ------------------------------------------------------------------ reading
    def fill(self, ours: str, dest: torch.Tensor, *, experts: tuple[int, int] | None = None) -> None:
        """Read our tensor `ours` into `dest` (any device and dtype); for a routed-expert stack,
        `experts=(lo, hi)`: dest holds global experts [lo, hi)."""
        with torch.no_grad():
            if experts is None:
                pieces = self.pieces[ours]
                assert len(pieces) == 1, (ours, [p.info.name for p in pieces])
                self._read_piece(pieces[0], dest)
                return
            lo, hi = experts
            by_expert = self._by_expert(ours)
            for p in by_expert.get(None, []):  # fused: rows lo..hi of the HF stack
                self._read_piece(p, dest, rows=(lo, hi))
            inter = self.cfg.moe_intermediate_size
            for e in range(lo, hi):
                for p in by_expert.get(e, []):
                    self._read_piece(p, dest[e - lo][_expert_rows(p.part, inter)])

    def _by_expert(self, ours: str) -> dict[int | None, list[Piece]]:
        if ours not in self._expert_index:
            index: dict[int | None, list[Piece]] = {}
            for p in sorted(self.pieces[ours], key=lambda p: (str(p.info.file), p.info.start)):
                index.setdefault(p.expert, []).append(p)
            self._expert_index[ours] = index
        return self._expert_index[ours]

    def _read_piece(self, p: Piece, region: torch.Tensor, *, rows: tuple[int, int] | None = None) -> None:
        if (p.scale is None and p.rope is None and region.dtype == p.info.dtype and region.device.type == "cpu"
                and region.is_contiguous()):
            read_into(p.info, region, rows=rows)  # straight into the destination
            return
        if (p.scale is not None and p.rope is None and rows is None and region.dtype == torch.float32
                and region.device.type == "cpu" and region.is_contiguous()):
            dequantize_fp8_blockwise(read(p.info), read(p.scale), out=region)
            return
        t = self._load(p.info, p.scale, rows=rows)
        if p.rope is not None:
            t = _permute_rope(t, self.cfg, p.rope, inverse=False)
        region.copy_(t)

    @staticmethod
    def _load(info: TensorInfo, scale: TensorInfo | None, *, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if scale is None:
            return read(info, rows=rows)
        w = dequantize_fp8_blockwise(read(info), read(scale))
        return w if rows is None else w[rows[0] : rows[1]]

    def check_shared_copies(self, model_state: dict[str, torch.Tensor] | None = None) -> None:
        """The MTP copies of embed_tokens / lm_head must equal the main tensors (megads shares
        them): compared with the folder's main tensors, or with `model_state`'s (those it holds),
        `_COMPARE_BLOCK` bytes of rows at a time."""
        for ours, info, scale in self.shared:
            if model_state is not None:
                if ours not in model_state:
                    continue
                held = model_state[ours]

                def main(lo: int, hi: int, held: torch.Tensor = held) -> torch.Tensor:
                    return held[lo:hi].detach().cpu()
            else:
                if not self.pieces.get(ours):
                    continue
                p = self.pieces[ours][0]

                def main(lo: int, hi: int, p: Piece = p) -> torch.Tensor:
                    return self._load(p.info, p.scale, rows=(lo, hi))
            expected = self.shapes[ours]
            same = info.shape == expected
            step = max(1, _COMPARE_BLOCK // max(1, info.row_bytes()))
            for lo in range(0, info.shape[0], step) if same else ():
                a = main(lo, min(lo + step, info.shape[0]))
                b = self._load(info, scale, rows=(lo, min(lo + step, info.shape[0])))
                if not torch.equal(b.to(a.dtype), a):
                    same = False
                    break
            if not same:
                raise CheckpointError(
                    f"{info.file}: the MTP copy of {ours} ({info.name}) differs from the main model's; megads shares "
                    "embedding and head with MTP (SPEC.md), so such a checkpoint cannot be represented"
                )


def _first_expert(model: torch.nn.Module, ours: str) -> int:
    """Global index of the first expert an (expert-sharded) stack of `model` holds."""
    return int(getattr(model.get_submodule(ours.rsplit(".", 1)[0]), "first_index", 0))


def load_hf_weights_into(
    model: DeepseekV3,
    path: str | os.PathLike[str],
    *,
    expert_start: int | None = None,
    init_missing_mtp: bool = False,
) -> None:
    """Fill `model` from the HF checkpoint folder `path`, reading only the tensors it holds.

    `model` may be a pipeline stage (some layers of the ModuleDict; embed_tokens / norm / lm_head
    / mtp None) and expert-sharded: its local expert j is global expert `expert_start + j`
    (None: each stack's own `first_index`, which `keep_expert_shard` records). Its parameters
    must be materialised (any device, any dtype: converted on the way). The MTP copies of the
    embedding / head are checked against what the model holds of them.

    `init_missing_mtp=True` accepts a checkpoint without any MTP tensors (e.g. one written by
    transformers, whose model has none) and leaves the model's MTP modules as they are.
    Raises CheckpointError naming the file and tensor (missing, unknown, mis-shaped, config).
    """
    cfg = model.cfg
    path = Path(path)
    _check_config(cfg, read_hf_config(path), str(path / "config.json"))
    ckpt = HFCheckpoint(path, cfg)
    state = model.state_dict()
    ranges: dict[str, tuple[int, int] | None] = {}
    missing: list[tuple[str, str]] = []  # (ours, HF name)
    E = cfg.n_routed_experts
    for ours, dest in state.items():
        if dest.is_meta:
            raise ValueError(f"{ours} is on the meta device: materialise the model (to_empty) before loading into it")
        experts = None
        if is_expert_tensor(ours):
            lo = _first_expert(model, ours) if expert_start is None else expert_start
            experts = (lo, lo + dest.shape[0])
            if lo < 0 or experts[1] > E:
                raise ValueError(f"{ours}: experts [{lo}, {experts[1]}) do not lie in [0, n_routed_experts={E})")
        ranges[ours] = experts
        missing += [(ours, hf) for hf in ckpt.missing(ours, experts)]
    skip: set[str] = set()
    if missing:
        mtp = {o for o in state if o.startswith("mtp.")}
        if init_missing_mtp and {o for o, _ in missing} <= mtp and not any(ckpt.pieces.get(o) for o in mtp):
            skip = mtp
        else:
            names = [hf for _, hf in missing]
            raise CheckpointError(
                f"{path}: {len(names)} tensors missing, e.g. {', '.join(names[:5])}"
                + (" (MTP layers: pass init_missing_mtp=True / --init-missing-mtp to start them fresh)"
                   if any(o.startswith("mtp.") for o, _ in missing) else "")
            )
    for ours, experts in ranges.items():
        if ours not in skip:
            ckpt.fill(ours, state[ours], experts=experts)
    if not skip and any(o.startswith("mtp.") for o in state):
        ckpt.check_shared_copies(state)


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
    load_hf_weights_into(model, path, init_missing_mtp=init_missing_mtp)
    return model


# --------------------------------------------------------------------------- export
class ExportSource(Protocol):
    """Our tensors, to be written in HF layout (a model in memory, a DCP checkpoint folder)."""

    cfg: ModelConfig

    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(our name, global shape, dtype) of every tensor, in model order."""
        ...

    def row_ranges(self, ours: str) -> list[tuple[int, int]]:
        """The dim-0 ranges a routed-expert stack is read in, one at a time."""
        ...

    def read(self, ours: str, rows: tuple[int, int] | None) -> torch.Tensor:
        """Our tensor (rows [lo, hi) of an expert stack) on the CPU."""
        ...


class ModelSource:
    """A single-process model's state dict as an ExportSource."""

    def __init__(self, model: DeepseekV3) -> None:
        self.cfg = model.cfg
        self._state = model.state_dict()

    def entries(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        return [(k, tuple(v.shape), v.dtype) for k, v in self._state.items()]

    def row_ranges(self, ours: str) -> list[tuple[int, int]]:
        return [(0, self._state[ours].shape[0])]

    def read(self, ours: str, rows: tuple[int, int] | None) -> torch.Tensor:
        t = self._state[ours].detach()
        return (t if rows is None else t[rows[0] : rows[1]]).cpu()


@dataclass(frozen=True)
class _Unit:
    """One read of the source (a tensor, or rows [lo, hi) of an expert stack) and its HF outputs."""

    ours: str
    rows: tuple[int, int] | None
    outs: list[tuple[str, ParamSpec | None, int | None]]  # (HF name, spec, global expert index)
    shape: tuple[int, ...]
    dtype: torch.dtype


def _export_units(source: ExportSource) -> list[_Unit]:
    cfg = source.cfg
    units: list[_Unit] = []
    have_mtp: set[int] = set()
    for ours, shape, dtype in source.entries():
        try:
            outs = megads_to_hf(ours, cfg)
        except KeyError:
            raise CheckpointError(f"{ours}: no Hugging Face name for this tensor (not in PARAM_TABLE)") from None
        if ours.startswith("mtp."):
            have_mtp.add(int(ours.split(".")[1]))
        if not is_expert_tensor(ours):
            units.append(_Unit(ours, None, outs, shape, dtype))
            continue
        order = {id(spec): i for i, spec in enumerate(PARAM_TABLE)}
        for lo, hi in source.row_ranges(ours):
            mine = [o for o in outs if o[2] is not None and lo <= o[2] < hi]
            mine.sort(key=lambda o: (o[2], order[id(o[1])]))
            units.append(_Unit(ours, (lo, hi), mine, shape, dtype))
    shapes = {u.ours: (u.shape, u.dtype) for u in units}
    for k in sorted(have_mtp):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        for hf_rest, ours in MTP_SHARED.items():
            if ours in shapes:
                units.append(_Unit(ours, None, [(prefix + hf_rest, None, None)], *shapes[ours]))
    return units


def _out_shape(unit: _Unit, spec: ParamSpec | None, e: int | None, inter: int) -> tuple[int, ...]:
    if e is None:
        return unit.shape
    inner = unit.shape[1:]
    return (inter, *inner[1:]) if spec is not None and spec.expert in ("gate", "up") else inner


def _planned(unit: _Unit, cfg: ModelConfig, *, fp8: bool) -> list[Planned]:
    out: list[Planned] = []
    for name, spec, e in unit.outs:
        shape = _out_shape(unit, spec, e, cfg.moe_intermediate_size)
        if fp8 and fp8_eligible(name, shape):
            out += [Planned(name, torch.float8_e4m3fn, shape),
                    Planned(name + "_scale_inv", torch.float32, fp8_scale_shape(shape))]
        else:
            out.append(Planned(name, unit.dtype, shape))
    return out


def _emit(unit: _Unit, t: torch.Tensor, cfg: ModelConfig, *, fp8: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of one unit, from its data `t` (in `_planned` order)."""
    for name, spec, e in unit.outs:
        v = t
        if e is not None and spec is not None:
            assert unit.rows is not None
            v = t[e - unit.rows[0]][_expert_rows(spec.expert, cfg.moe_intermediate_size)]
        if spec is not None and spec.rope is not None:
            v = _permute_rope(v, cfg, spec.rope, inverse=True)
        v = v.contiguous()
        if fp8 and fp8_eligible(name, tuple(v.shape)):
            q, s = quantize_fp8_blockwise(v)
            yield name, q
            yield name + "_scale_inv", s
        else:
            yield name, v


def _shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_hf_folder(
    source: ExportSource,
    path: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    fp8: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> int:
    """Write `source` as a HF checkpoint folder (config.json, safetensors shards of at most
    `max_shard_bytes` + index), atomically; returns the bytes of tensors written.

    Every output tensor is planned (name, dtype, shape, shard) before any is read; then the
    source is read one unit at a time (a tensor, or the experts of one saved chunk) and each
    shard file is written as its tensors arrive: memory is one unit and its outputs, whatever
    the shard size.
    """
    cfg = source.cfg
    units = _export_units(source)
    plans = [_planned(u, cfg, fp8=fp8) for u in units]
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in (p for plan in plans for p in plan):
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    files = _shard_names(len(shards))
    shard_of = {p.name: i for i, shard in enumerate(shards) for p in shard}
    total = sum(p.nbytes for shard in shards for p in shard)
    dst = Path(path)
    with atomic_folder(dst, overwrite=overwrite, error=CheckpointError) as tmp:
        writers: dict[int, ShardWriter] = {}
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="to-hf", file=sys.stderr,
                  disable=not progress, mininterval=0.5) as bar:
            for unit in units:
                t = source.read(unit.ours, unit.rows)
                for name, v in _emit(unit, t, cfg, fp8=fp8):
                    i = shard_of[name]
                    if i not in writers:
                        writers[i] = ShardWriter(tmp / files[i], shards[i], metadata={"format": "pt"})
                    writers[i].write(name, v)
                    if writers[i].done:
                        writers.pop(i).close()
                    bar.update(v.nbytes)
                del t
        assert not writers, sorted(writers)
        if len(shards) > 1:
            weight_map = {name: files[i] for name, i in shard_of.items()}
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
            )
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = str(shards[0][0].dtype).removeprefix("torch.")
        if fp8:
            hf_cfg["quantization_config"] = {
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
            }
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    return total


def to_hf(
    model: DeepseekV3,
    path: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 5 * 1024**3,
    fp8: bool = False,
    overwrite: bool = False,
) -> None:
    """Write `model` as a HF checkpoint folder (config.json, sharded safetensors + index), atomically."""
    write_hf_folder(ModelSource(model), path, max_shard_bytes=max_shard_bytes, fp8=fp8, overwrite=overwrite)
