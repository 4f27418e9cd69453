"""Logit parity against transformers' DeepseekV3 and checkpoint-conversion behaviour.

The reference is `transformers.DeepseekV3ForCausalLM` (written by nobody here). Every case
saves a random HF model with `save_pretrained`, loads it with `megads.from_hf`, and compares
float32 logits (tolerance 1e-4 max-abs); then `megads.to_hf` + `from_pretrained` must give the
same logits again, and re-importing must reproduce our weights (MTP included) bit for bit.
The streaming converters (`megads-convert`, HF <-> megads checkpoint folder) are checked here
end to end against transformers and in tests/test_convert_streaming.py bit for bit.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import megads
from megads.convert.hf import CheckpointError, dequantize_fp8_blockwise, quantize_fp8_blockwise

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

TOL = 1e-4
BASE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=2, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
    first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8,
    v_head_dim=8, max_position_embeddings=64, num_nextn_predict_layers=1,
)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CASES = {
    "q_lora+groups": {},
    "direct_q": {"q_lora_rank": None},
    "yarn": {"rope_scaling": YARN},
    "all_moe_one_group": {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1},
    "two_dense_mtp2": {"first_k_dense_replace": 2, "num_hidden_layers": 4, "num_nextn_predict_layers": 2,
                       "rope_scaling": {**YARN, "factor": 2.0, "mscale": 0.707, "mscale_all_dim": 0.707}},
}


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def make_hf_model(seed: int, **overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides})).float().eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if "e_score_correction_bias" in name:
                buf.uniform_(-0.2, 0.2)  # biases that change the selection, as after training
        for name, p in model.named_parameters():
            if "experts" in name or "gate.weight" in name:
                p.normal_(0.0, 0.3)  # spread router scores so group limits bite
    return model


def hf_logits(model: DeepseekV3ForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def ours_logits(model: megads.model.DeepseekV3, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_logit_parity_and_round_trip(case: str, tmp_path: Path) -> None:
    hf = make_hf_model(zlib.crc32(case.encode()) % 1000, **CASES[case])  # hash(str) is salted per process
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf, ids)

    ours = megads.from_hf(tmp_path / "hf", init_missing_mtp=True)
    assert ours.cfg.num_nextn_predict_layers == CASES[case].get("num_nextn_predict_layers", 1)
    assert (ours_logits(ours, ids) - ref).abs().max().item() < TOL

    megads.to_hf(ours, tmp_path / "back")
    hf2 = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    assert (hf_logits(hf2, ids) - ref).abs().max().item() < TOL

    again = megads.from_hf(tmp_path / "back")  # MTP layers now present: no init_missing_mtp
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert any(k.startswith("mtp.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_rope_permutation_is_needed(tmp_path: Path) -> None:
    """Loading the interleaved checkpoint without the row permutation must change the logits."""
    hf = make_hf_model(3)
    with torch.no_grad():  # large attention weights so positions (and so rope rows) matter
        for name, p in hf.named_parameters():
            if "q_b_proj" in name or "kv_a_proj" in name:
                p.normal_(0.0, 1.0)
    hf.save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    raw = json.loads(cfg_file.read_text())
    ids = torch.randint(0, BASE["vocab_size"], (1, 16))
    ref = hf_logits(hf, ids)
    raw["rope_interleave"] = False
    cfg_file.write_text(json.dumps(raw))
    wrong = megads.from_hf(tmp_path / "hf", init_missing_mtp=True)
    assert (ours_logits(wrong, ids) - ref).abs().max().item() > 1e-2


def test_mtp_weights_survive_round_trip(tmp_path: Path) -> None:
    hf = make_hf_model(4)
    hf.save_pretrained(tmp_path / "hf")
    ours = megads.from_hf(tmp_path / "hf", init_missing_mtp=True)
    megads.to_hf(ours, tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    L = BASE["num_hidden_layers"]
    for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "mlp.gate.weight"):
        assert f"model.layers.{L}.{name}" in tensors, name
    assert torch.equal(tensors[f"model.layers.{L}.eh_proj.weight"], ours.mtp["0"].eh_proj.weight)
    # MTP losses are computed from those weights
    ids = torch.randint(0, BASE["vocab_size"], (2, 12))
    out = ours(ids)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape == (2, 11, BASE["vocab_size"])


def test_fp8_checkpoint_dequantises_within_fp8_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    w = torch.randn(300, 260) * torch.logspace(-3, 1, 260)  # columns of very different scale
    q, scale_inv = quantize_fp8_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and scale_inv.shape == (3, 3)
    deq = dequantize_fp8_blockwise(q, scale_inv)
    # E4M3: 3 mantissa bits -> relative rounding error <= 2^-4 for normals; subnormal floor 2^-9 * scale
    block_scale = scale_inv.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    bound = w.abs() * 2**-4 + block_scale * 2**-9 + 1e-12
    assert ((deq - w).abs() <= bound).all()
    assert (deq - w).abs().max() > 0  # it really was quantised

    # A whole checkpoint: to_hf(fp8=True) writes weight_scale_inv; from_hf dequantises it.
    hf = make_hf_model(5)
    hf.save_pretrained(tmp_path / "hf")
    ours = megads.from_hf(tmp_path / "hf", init_missing_mtp=True)
    megads.to_hf(ours, tmp_path / "fp8", fp8=True)
    stored = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.self_attn.q_b_proj.weight_scale_inv" in stored
    back = megads.from_hf(tmp_path / "fp8")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        if a.is_floating_point() and a.numel():
            assert ((a - b).abs() <= a.abs() * 2**-4 + a.abs().max() * 2**-9 + 1e-12).all(), name


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def sharded_ckpt(tmp_path: Path) -> Path:
    hf = make_hf_model(6)
    hf.save_pretrained(tmp_path / "hf")
    model = megads.from_hf(tmp_path / "hf", init_missing_mtp=True)
    megads.to_hf(model, tmp_path / "sharded", max_shard_bytes=20_000)
    return tmp_path / "sharded"


def test_sharded_layout_loads(sharded_ckpt: Path) -> None:
    index = json.loads((sharded_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    megads.from_hf(sharded_ckpt)


def test_missing_shard_names_the_file(sharded_ckpt: Path) -> None:
    victim = sorted(sharded_ckpt.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        megads.from_hf(sharded_ckpt)


def test_shape_mismatch_names_tensor_and_file(sharded_ckpt: Path) -> None:
    index = json.loads((sharded_ckpt / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    file = sharded_ckpt / index["weight_map"][name]
    tensors = load_file(str(file))
    tensors[name] = tensors[name][:-1]
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=rf"{file.name}.*{name}.*shape"):
        megads.from_hf(sharded_ckpt)


def test_unknown_and_missing_tensors(sharded_ckpt: Path) -> None:
    index_file = sharded_ckpt / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    file = sharded_ckpt / index["weight_map"][name]
    tensors = load_file(str(file))
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(file))
    index["weight_map"]["model.layers.0.self_attn.surprise.weight"] = file.name
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unknown tensor model.layers.0.self_attn.surprise.weight"):
        megads.from_hf(sharded_ckpt)
    del tensors["model.layers.0.self_attn.surprise.weight"], tensors[name]
    save_file(tensors, str(file))
    del index["weight_map"]["model.layers.0.self_attn.surprise.weight"], index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"missing.*{name}"):
        megads.from_hf(sharded_ckpt)


def test_config_mismatch_names_the_field(sharded_ckpt: Path) -> None:
    cfg = megads.from_hf(sharded_ckpt).cfg.replace(kv_lora_rank=16)
    with pytest.raises(CheckpointError, match="kv_lora_rank"):
        megads.from_hf(sharded_ckpt, config=cfg)


def test_export_never_clobbers(tmp_path: Path) -> None:
    hf = make_hf_model(7)
    hf.save_pretrained(tmp_path / "hf")
    model = megads.from_hf(tmp_path / "hf", init_missing_mtp=True)
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not empty"):
        megads.to_hf(model, dst)
    assert (dst / "notes.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".taken.tmp-*"))


def test_convert_cli_round_trip(tmp_path: Path) -> None:
    """transformers folder -> megads checkpoint folder (DCP) -> HF folder -> transformers: same logits."""
    from megads.convert.cli import main

    hf = make_hf_model(8)
    hf.save_pretrained(tmp_path / "hf")
    ckpt, hf2_dir = tmp_path / "ckpt", tmp_path / "hf2"
    assert main(["from-hf", str(tmp_path / "hf"), str(ckpt), "--init-missing-mtp", "--no-progress"]) == 0
    assert (ckpt / "meta.json").is_file() and (ckpt / ".metadata").is_file()
    assert main(["to-hf", str(ckpt), str(hf2_dir), "--no-progress"]) == 0
    ids = torch.randint(0, BASE["vocab_size"], (1, 10))
    hf2 = DeepseekV3ForCausalLM.from_pretrained(hf2_dir, dtype=torch.float32).eval()
    assert (hf_logits(hf2, ids) - hf_logits(hf, ids)).abs().max().item() < TOL
    assert main(["from-hf", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
