"""Streaming conversion: HF folder <-> megads checkpoint folder (DCP), one tensor at a time.

References: the HF folder we started from (HF -> DCP -> HF must give every tensor back bit for
bit, in its dtype), the in-memory `from_hf` model (whose logits `load_model` of the converted
folder must reproduce exactly; it is itself checked against transformers in
tests/test_hf_conversion.py), and the safetensors library (which must read what our shard
writer writes, and write what our reader reads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import megads
import megads.convert.hf as hf_mod
from megads.checkpoint.dcp import commit_folder, read_meta, saved_keys, verify_folder
from megads.checkpoint.lazy import CheckpointReader, LazyTensor, save_lazy
from megads.convert.checkpoint import convert_from_hf, convert_to_hf, load_model
from megads.convert.cli import main
from megads.convert.hf import CheckpointError, load_hf_weights_into, megads_to_hf
from megads.convert.safetensors_io import Planned, ShardWriter, read, read_header
from megads.model.transformer import DeepseekV3
from megads.parallel.expert_parallel import keep_expert_shard

pytest.importorskip("transformers")
from test_hf_conversion import BASE, make_hf_model  # noqa: E402

SHARD = 40_000  # bytes: several shards even for the test model
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


pytestmark = pytest.mark.usefixtures("quiet_transformers")


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module", params=list(DTYPES))
def hf_src(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded HF folder in `dtype` with per-expert tensors and an MTP layer (megads' to_hf of
    a transformers model)."""
    root = tmp_path_factory.mktemp(f"src_{request.param}")
    make_hf_model(11).save_pretrained(root / "transformers")
    model = megads.from_hf(root / "transformers", init_missing_mtp=True).to(DTYPES[request.param])
    megads.to_hf(model, root / "hf", max_shard_bytes=SHARD)
    return root / "hf"


@pytest.fixture(scope="module")
def dcp_dir(hf_src: Path) -> Path:
    convert_from_hf(hf_src, hf_src.parent / "dcp")
    return hf_src.parent / "dcp"


def test_round_trip_is_bit_identical(hf_src: Path, dcp_dir: Path, tmp_path: Path) -> None:
    meta = verify_folder(dcp_dir)
    assert meta["format"] == 2 and meta["step"] == 0 and meta["weights_only"] is True
    assert meta["source"] == str(hf_src.resolve()) and meta["model"]["n_routed_experts"] == BASE["n_routed_experts"]
    keys = saved_keys(dcp_dir)
    assert all(k.startswith("model.") for k in keys)
    E, inter, D = BASE["n_routed_experts"], BASE["moe_intermediate_size"], BASE["hidden_size"]
    for layer in ("layers.1", "mtp.0.block"):
        assert tuple(keys[f"model.{layer}.mlp.experts.gate_up_proj.weight"].size) == (E, 2 * inter, D)
        assert tuple(keys[f"model.{layer}.mlp.experts.down_proj.weight"].size) == (E, D, inter)
    src = _all_tensors(hf_src)
    assert {keys[k].properties.dtype for k in keys} == {t.dtype for t in src.values()}  # stored dtype kept

    convert_to_hf(dcp_dir, tmp_path / "back", max_shard_bytes=SHARD)
    back = _all_tensors(tmp_path / "back")
    assert back.keys() == src.keys()
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(back)
    for name, file in index["weight_map"].items():
        assert name in safe_open(str(tmp_path / "back" / file), "pt").keys()
        raw = (tmp_path / "back" / file).read_bytes()
        assert len(raw) - 8 - int.from_bytes(raw[:8], "little") <= SHARD  # tensor bytes within the shard limit
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == str(t.dtype)[6:]


def test_load_model_logits_equal_from_hf(hf_src: Path, dcp_dir: Path) -> None:
    ids = torch.randint(0, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    ours, ref = load_model(dcp_dir).eval(), megads.from_hf(hf_src).eval()
    with torch.no_grad():
        a, b = ours(ids), ref(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits[0], b.mtp_logits[0])
    sa, sb = ours.state_dict(), ref.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_fp8_source_is_dequantised_on_the_fly(tmp_path: Path) -> None:
    make_hf_model(12).save_pretrained(tmp_path / "transformers")
    model = megads.from_hf(tmp_path / "transformers", init_missing_mtp=True)
    megads.to_hf(model, tmp_path / "fp8", fp8=True, max_shard_bytes=SHARD)
    convert_from_hf(tmp_path / "fp8", tmp_path / "dcp")
    keys = saved_keys(tmp_path / "dcp")
    assert keys["model.layers.0.self_attn.q_b_proj.weight"].properties.dtype == torch.float32
    assert keys["model.layers.1.mlp.experts.gate_up_proj.weight"].properties.dtype == torch.float32
    ref, ours = megads.from_hf(tmp_path / "fp8").state_dict(), load_model(tmp_path / "dcp").state_dict()
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    convert_to_hf(tmp_path / "dcp", tmp_path / "again", fp8=True)
    again = _all_tensors(tmp_path / "again")
    assert again["model.layers.1.mlp.experts.3.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv" in again


# ------------------------------------------------------------------------------- bad folders
def _fails(capsys: pytest.CaptureFixture[str], src: Path, dst: Path, *needles: str) -> None:
    assert main(["to-hf", str(src), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not dst.exists()


def test_corrupt_folder_is_refused_naming_the_file(
    dcp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "hf"
    short = tmp_path / "short"
    shutil.copytree(dcp_dir, short)
    data = sorted(short.glob("*.distcp"))[0]
    with data.open("r+b") as f:
        f.truncate(data.stat().st_size - 100)
    _fails(capsys, short, out, str(data), "truncated")

    flipped = tmp_path / "flipped"
    shutil.copytree(dcp_dir, flipped)
    data = sorted(flipped.glob("*.distcp"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    _fails(capsys, flipped, out, str(data), "SHA-256")

    unfinished = tmp_path / "step_00000002.tmp"
    shutil.copytree(dcp_dir, unfinished)
    (unfinished / "meta.json").unlink()
    _fails(capsys, unfinished, out, str(unfinished), "not a completed checkpoint", "interrupted")

    old = tmp_path / "old"
    shutil.copytree(dcp_dir, old)
    (old / "meta.json").write_text(json.dumps({"format": 1, "step": 3, "world_size": 2}))
    _fails(capsys, old, out, "format 1")

    no_model = tmp_path / "no_model"
    shutil.copytree(dcp_dir, no_model)
    meta = read_meta(no_model)
    del meta["model"]
    (no_model / "meta.json").write_text(json.dumps(meta))
    _fails(capsys, no_model, out, "records no model config")

    _fails(capsys, dcp_dir.parent / "hf", out, "Hugging Face folder", "from-hf")


def test_cli_refuses_an_existing_destination(hf_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = tmp_path / "ckpt"
    assert main(["from-hf", str(hf_src), str(dst), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["from-hf", str(hf_src), str(dst), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["from-hf", str(hf_src), str(dst), "--no-progress", "--overwrite"]) == 0
    verify_folder(dst)
    assert main(["to-hf", str(dst), str(tmp_path / "hf"), "--no-progress"]) == 0
    assert main(["to-hf", str(dst), str(tmp_path / "hf"), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*tmp*"))  # no staging folder left behind
    assert main(["from-hf", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--no-progress"]) == 2


def test_missing_mtp_is_refused_or_initialised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_hf_model(13).save_pretrained(tmp_path / "transformers")  # transformers writes no MTP layers
    assert main(["from-hf", str(tmp_path / "transformers"), str(tmp_path / "x"), "--no-progress"]) == 2
    assert "--init-missing-mtp" in capsys.readouterr().err
    meta = convert_from_hf(tmp_path / "transformers", tmp_path / "dcp", init_missing_mtp=True)
    loaded = load_model(tmp_path / "dcp")
    assert loaded.cfg.num_nextn_predict_layers == 1
    ours = loaded.state_dict()
    ref = megads.from_hf(tmp_path / "transformers", init_missing_mtp=True).state_dict()
    # fresh MTP tensors: what the whole model of that seed draws (megads.model.init), stored in the HF dtype
    fresh = DeepseekV3(loaded.cfg, init_seed=meta["mtp_init_seed"]).state_dict()
    for k in ref:
        assert torch.equal(ours[k], fresh[k] if k.startswith("mtp.") else ref[k]), k


# ------------------------------------------------------------------------------- expert chunks
def test_to_hf_reads_each_saved_chunk_once(hf_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder whose experts are stored in chunks of 4 (as ep=2 ranks save them): to-hf reads
    each chunk once, as one box, and still writes every expert."""
    model = megads.from_hf(hf_src, dtype=_all_tensors(hf_src)["model.embed_tokens.weight"].dtype)
    state = {}
    for k, v in model.state_dict().items():
        chunks = None
        if "mlp.experts." in k:
            chunks = [((lo, *[0] * (v.dim() - 1)), (4, *v.shape[1:])) for lo in range(0, v.shape[0], 4)]
        state["model." + k] = LazyTensor(tuple(v.shape), v.dtype, lambda o, s, v=v: v[o[0] : o[0] + s[0]].clone(), chunks)
    save_lazy(tmp_path / "tmp", {**state, "optim.meta": {"step": 3}, "loader": {"windows": 2}})
    commit_folder(tmp_path / "tmp", tmp_path / "ckpt", meta={"step": 3, "model": read_meta(hf_src.parent / "dcp")["model"]})
    boxes: list[tuple[str, tuple[int, ...] | None]] = []
    real = CheckpointReader.read_box

    def spy(self: CheckpointReader, key: str, offsets=None, sizes=None) -> torch.Tensor:
        boxes.append((key, None if sizes is None else tuple(sizes)))
        return real(self, key, offsets, sizes)

    monkeypatch.setattr(CheckpointReader, "read_box", spy)
    convert_to_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=SHARD)
    expert_reads = [b for b in boxes if "mlp.experts." in b[0]]
    assert len(expert_reads) == 2 * 2 * 3  # (gate_up, down) x 2 chunks x (2 MoE layers + MTP block)
    assert all(size is not None and size[0] == 4 for _, size in expert_reads)
    src, back = _all_tensors(hf_src), _all_tensors(tmp_path / "hf")
    assert back.keys() == src.keys() and all(torch.equal(back[k], src[k]) for k in src)


def test_save_lazy_holds_one_produced_tensor_at_a_time(tmp_path: Path) -> None:
    alive: list[torch.Tensor] = []

    def produce(offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        assert all(t.untyped_storage().nbytes() == 0 for t in alive), "the previous tensor is still held"
        t = torch.full(sizes, float(offsets[0] + len(alive)), dtype=torch.bfloat16)
        alive.append(t)
        return t

    state = {"a": LazyTensor((4, 3, 5), torch.bfloat16, produce, [((e, 0, 0), (1, 3, 5)) for e in range(4)]),
             "b": LazyTensor((7,), torch.bfloat16, produce), "plain": torch.arange(3), "obj": {"x": 1}}
    save_lazy(tmp_path / "f", state)
    assert len(alive) == 5
    reader = CheckpointReader(tmp_path / "f")
    assert reader.row_ranges("a") == [(0, 1), (1, 2), (2, 3), (3, 4)]
    a = reader.read_box("a")
    assert [float(a[e, 0, 0]) for e in range(4)] == [0.0, 2.0, 4.0, 6.0]  # expert e was produced e-th
    assert torch.equal(reader.read_box("a", (2, 0, 0), (1, 3, 5)), a[2:3])
    assert torch.equal(reader.read_box("plain"), torch.arange(3))


# ------------------------------------------------------------------------------- stage loading
def _stage_model(cfg, *, keep_layers: set[int], ep: int, ep_rank: int) -> DeepseekV3:
    """A pipeline stage as build_stage_model makes one: some layers, no embedding, an expert shard."""
    torch.manual_seed(5)
    model = DeepseekV3(cfg)
    for name in list(model.layers.keys()):
        if int(name) not in keep_layers:
            del model.layers[name]
    model.embed_tokens = None
    keep_expert_shard(model, ep_size=ep, ep_rank=ep_rank)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.fill_(float("nan"))
    return model


def _expected_reads(cfg, state: dict[str, torch.Tensor], lo: int, hi: int) -> set[str]:
    names = set()
    for ours in state:
        for hf, _, e in megads_to_hf(ours, cfg):
            if e is None or lo <= e < hi:
                names.add(hf)
    return names


@pytest.mark.parametrize("explicit_start", [True, False])
def test_load_hf_weights_into_a_stage_reads_only_its_tensors(
    hf_src: Path, monkeypatch: pytest.MonkeyPatch, explicit_start: bool
) -> None:
    full = megads.from_hf(hf_src)
    cfg = full.cfg
    E = cfg.n_routed_experts
    stage = _stage_model(cfg, keep_layers={1, 2}, ep=2, ep_rank=1)
    names_read: list[str] = []
    real_read, real_read_into = hf_mod.read, hf_mod.read_into
    monkeypatch.setattr(hf_mod, "read", lambda info, **kw: (names_read.append(info.name), real_read(info, **kw))[1])
    monkeypatch.setattr(hf_mod, "read_into",
                        lambda info, out, **kw: (names_read.append(info.name), real_read_into(info, out, **kw))[1])
    load_hf_weights_into(stage, hf_src, expert_start=E // 2 if explicit_start else None)

    ref = full.state_dict()
    state = stage.state_dict()
    assert {k.split(".")[1] for k in state if k.startswith("layers.")} == {"1", "2"}
    for name, t in state.items():
        want = ref[name][E // 2 :] if "mlp.experts." in name else ref[name]
        assert t.dtype == want.dtype and torch.equal(t, want), name
    # only its tensors: layers 1-2, experts E/2..E-1, norm, head, MTP layer; plus the MTP copy of
    # the head it holds (checked against it); no embedding, no layer 0, no other expert
    L = cfg.num_hidden_layers
    expected = _expected_reads(cfg, state, E // 2, E) | {f"model.layers.{L}.shared_head.head.weight"}
    assert set(names_read) == expected
    assert len(names_read) == len(expected)  # each once
    assert not any(".experts.0." in n or "layers.0." in n or "embed_tokens" in n for n in names_read)


def test_load_hf_weights_into_errors(hf_src: Path, tmp_path: Path) -> None:
    cfg = megads.from_hf(hf_src).cfg
    broken = tmp_path / "hf"
    shutil.copytree(hf_src, broken)
    index_file = broken / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    victim = "model.layers.2.mlp.experts.5.down_proj.weight"
    file = broken / index["weight_map"][victim]
    tensors = load_file(str(file))
    tensors[victim] = tensors[victim][:, :-1].contiguous()
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match=rf"{file.name}.*{victim}.*shape"):
        load_hf_weights_into(_stage_model(cfg, keep_layers={2}, ep=2, ep_rank=1), broken)
    del tensors[victim], index["weight_map"][victim]
    save_file(tensors, str(file))
    index_file.write_text(json.dumps(index))
    load_hf_weights_into(_stage_model(cfg, keep_layers={2}, ep=2, ep_rank=0), broken)  # not its expert: fine
    with pytest.raises(CheckpointError, match=f"missing.*{victim}"):
        load_hf_weights_into(_stage_model(cfg, keep_layers={2}, ep=2, ep_rank=1), broken)
    with torch.device("meta"):
        unmaterialised = DeepseekV3(cfg)
    with pytest.raises(ValueError, match="meta device"):
        load_hf_weights_into(unmaterialised, hf_src)


def test_fused_expert_layout(hf_src: Path, tmp_path: Path) -> None:
    """transformers>=5's fused `mlp.experts.gate_up_proj` [E, 2I, D] / `down_proj` [E, D, I]."""
    full = megads.from_hf(hf_src)
    cfg = full.cfg
    sd = full.state_dict()
    tensors = _all_tensors(hf_src)
    dtype = tensors["model.embed_tokens.weight"].dtype
    fused = {k: v for k, v in tensors.items() if ".mlp.experts." not in k}
    for ours in (k for k in sd if ".mlp.experts." in k):  # layers.1.mlp.experts.gate_up_proj.weight, mtp.0.block...
        layer = int(ours.split(".")[1]) + (cfg.num_hidden_layers if ours.startswith("mtp.") else 0)
        fused[f"model.layers.{layer}.mlp.experts.{ours.split('.')[-2]}"] = sd[ours].to(dtype).contiguous()
    (tmp_path / "fused").mkdir()
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    shutil.copy(hf_src / "config.json", tmp_path / "fused" / "config.json")
    again = megads.from_hf(tmp_path / "fused").state_dict()
    assert all(torch.equal(again[k], sd[k]) for k in sd)
    stage = _stage_model(cfg, keep_layers={1}, ep=4, ep_rank=2)
    load_hf_weights_into(stage, tmp_path / "fused")
    w = stage.state_dict()["layers.1.mlp.experts.gate_up_proj.weight"]
    assert torch.equal(w, sd["layers.1.mlp.experts.gate_up_proj.weight"][4:6])


# ------------------------------------------------------------------------------- safetensors I/O
def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def test_safetensors_io_agrees_with_the_library(tmp_path: Path) -> None:
    tensors = {
        "bf16": torch.randn(5, 3).to(torch.bfloat16), "f32": torch.randn(2, 2, 2),
        "fp8": torch.randn(4, 4).to(torch.float8_e4m3fn), "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4), "i64": torch.arange(6).view(2, 3),
    }
    planned = [Planned(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    writer = ShardWriter(tmp_path / "ours.safetensors", planned, metadata={"format": "pt"})
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    theirs = load_file(str(tmp_path / "ours.safetensors"))  # the library reads what we write
    assert theirs.keys() == tensors.keys() and all(_same_bytes(theirs[k], v) for k, v in tensors.items())
    save_file(tensors, str(tmp_path / "lib.safetensors"))  # we read what the library writes
    header = read_header(tmp_path / "lib.safetensors")
    assert all(_same_bytes(read(header[k]), v) for k, v in tensors.items())
    assert torch.equal(read(header["bf16"], rows=(1, 4)), tensors["bf16"][1:4])
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "lib.safetensors").read_bytes()[:-8])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        read_header(tmp_path / "cut.safetensors")
