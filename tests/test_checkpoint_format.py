"""Step folders: layout-independent initial weights, integrity checks with fallback, pruning,
and the asynchronous save (megads.checkpoint, megads.parallel.stages.build_stage_model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megads.checkpoint.dcp import CheckpointCorrupt, ShardView, completed_steps, read_tensors, verify_folder
from megads.checkpoint.writer import CheckpointWriter, pick_resume
from megads.model.transformer import DeepseekV3
from megads.parallel.stages import build_stage_model, piece_specs
from megads.testing.parallel import spawn, tiny_config


# ---------------------------------------------------------------------------------------- init
@pytest.mark.parametrize(
    "stage_layers, pieces, ep_size, ep_rank",
    [([2, 2], [1], 2, 1),  # 1F1B pp2, last stage, second expert shard
     ([1, 1, 1, 1], [0, 3], 1, 0),  # DualPipeV pp2: rank 0 holds the V's two ends
     ([1, 3], [0], 4, 2)],  # uneven split, ep4
)
def test_initial_weights_do_not_depend_on_the_layout(
    stage_layers: list[int], pieces: list[int], ep_size: int, ep_rank: int
) -> None:
    cfg = tiny_config()
    torch.manual_seed(11)
    full = DeepseekV3(cfg).state_dict()
    specs = [piece_specs(stage_layers)[p] for p in pieces]
    stage = build_stage_model(cfg, specs=specs, seed=11, ep_size=ep_size, ep_rank=ep_rank)
    got = stage.state_dict()
    held = {str(i) for s in specs for i in s.layers}
    assert {k.split(".")[1] for k in got if k.startswith("layers.")} == held  # nothing else was built
    E = cfg.n_routed_experts // ep_size
    for name, t in got.items():
        want = full[name]
        if ".experts." in name:
            want = want[ep_rank * E:(ep_rank + 1) * E]
            assert t.shape[0] == E, name  # never another rank's experts
        assert torch.equal(t, want), name
    # the values depend on the name: two layers of the same shape differ
    assert not torch.equal(full["layers.1.self_attn.q_a_proj.weight"], full["layers.2.self_attn.q_a_proj.weight"])


def test_uninitialised_build_allocates_only_the_rank_share() -> None:
    cfg = tiny_config()
    spec = piece_specs([2, 2])[0]
    m = build_stage_model(cfg, specs=[spec], seed=0, ep_size=2, ep_rank=0, init=False)
    assert not any(p.is_meta for p in m.parameters())
    assert m.lm_head is None and m.mtp is None and m.embed_tokens is not None
    for mod in m.modules():  # routers' buffers are zeroed even without init (they are not loaded)
        if hasattr(mod, "tokens_per_expert"):
            assert not mod.tokens_per_expert.any() and not mod.e_score_correction_bias.any()


# ---------------------------------------------------------------------------------------- folders
def _save(root: Path, step: int, *, keep_last: int = 0, value: float | None = None) -> Path:
    v = float(step) if value is None else value
    entries = {"model.w": torch.full((64, 64), v), "run": {"step": step}}
    return CheckpointWriter(root, keep_last=keep_last).save(step, entries, meta={"step": step})


def _data_file(folder: Path) -> Path:
    return next(folder.glob("__0_*.distcp"))


def test_truncated_or_altered_latest_falls_back_to_the_previous(tmp_path: Path) -> None:
    for s in (1, 2, 3):
        _save(tmp_path, s)
    assert pick_resume(tmp_path) == tmp_path / "step_00000003"
    f3 = _data_file(tmp_path / "step_00000003")
    f3.write_bytes(f3.read_bytes()[:-10])  # truncated
    f2 = _data_file(tmp_path / "step_00000002")
    raw = bytearray(f2.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte altered
    f2.write_bytes(bytes(raw))
    warnings: list[str] = []
    assert pick_resume(tmp_path, warn=warnings.append) == tmp_path / "step_00000001"
    assert str(f3) in warnings[0] and "truncated" in warnings[0]
    assert str(f2) in warnings[1] and "SHA-256" in warnings[1]
    assert "step_00000001 instead of step_00000003, step_00000002" in warnings[2]
    # sizes only: the altered file passes, the truncated one does not
    assert pick_resume(tmp_path, verify="size", warn=warnings.append) == tmp_path / "step_00000002"
    # an explicitly named corrupt folder is refused, naming the file
    with pytest.raises(CheckpointCorrupt, match=str(f3)):
        pick_resume(tmp_path, explicit=tmp_path / "step_00000003")
    assert read_tensors(tmp_path / "step_00000001")["w"].eq(1.0).all()


def test_folders_without_marker_never_count_and_all_corrupt_is_an_error(tmp_path: Path) -> None:
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (tmp_path / "step_00000002" / "meta.json").unlink()  # a save interrupted before its marker
    (tmp_path / "step_00000005.tmp").mkdir()  # and one interrupted earlier
    assert completed_steps(tmp_path) == [tmp_path / "step_00000001"]
    assert pick_resume(tmp_path) == tmp_path / "step_00000001"
    with pytest.raises(CheckpointCorrupt, match="meta.json: missing"):
        verify_folder(tmp_path / "step_00000002")
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    with pytest.raises(CheckpointCorrupt, match="every checkpoint is corrupt"):
        pick_resume(tmp_path, warn=lambda _: None)
    assert pick_resume(tmp_path / "empty") is None


def test_keep_last_prunes_completed_folders_only(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path, keep_last=2)  # (a writer removes stale .tmp folders when it starts)
    (tmp_path / "step_00000009.tmp").mkdir(parents=True)
    for s in (1, 2, 3, 4):
        writer.save(s, {"model.w": torch.full((64, 64), float(s)), "run": {"step": s}}, meta={"step": s})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step_00000003", "step_00000004", "step_00000009.tmp"], names
    manifest = json.loads((tmp_path / "step_00000004" / "manifest.json").read_text())
    assert ".metadata" in manifest["files"] and all(len(e["sha256"]) == 64 for e in manifest["files"].values())


def _async_worker(rank: int, world: int, root: str) -> None:
    w = torch.full((256, 256), float(rank))
    entries = {"model.w": ShardView(w, (256 * world, 256), (256 * rank, 0)), "run": {"step": 1}}
    writer = CheckpointWriter(Path(root), keep_last=0, async_save=True)
    writer.save(1, entries, meta={"step": 1})
    w.add_(100.0)  # training goes on while the background thread writes: the save keeps step 1's values
    dist.all_reduce(torch.ones(1))  # and the training group keeps working meanwhile
    writer.wait()
    assert writer.blocking_s and writer.total_s


def test_async_save_writes_the_state_of_the_save_call(tmp_path: Path) -> None:
    spawn(2, _async_worker, str(tmp_path))
    w = read_tensors(verify_folder(tmp_path / "step_00000001") and tmp_path / "step_00000001")["w"]
    assert torch.equal(w[:256], torch.zeros(256, 256)) and torch.equal(w[256:], torch.ones(256, 256))


# ---------------------------------------------------------------------------------------- replicas
def _replica_worker(rank: int, world: int, root: str) -> None:
    from megads.checkpoint.state import training_entries
    from megads.parallel.executor import ParallelExecutor
    from megads.parallel.mesh import ParallelMesh
    from megads.testing.parallel import LayoutSpec, plan_spec

    cfg = tiny_config()
    spec = LayoutSpec(pp=2, ep=1, schedule="dualpipe")  # both ranks hold both pieces: all state twice
    plan = plan_spec(cfg, spec, world=world)
    ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, schedule=spec.schedule, seed=3)
    entries = training_entries(ex, step=1, tokens=0.0, loader_state={"windows": 0})
    CheckpointWriter(Path(root), keep_last=0).save(1, entries, meta={"step": 1})


def test_replicated_state_is_written_once(tmp_path: Path) -> None:
    """DualPipe's two replicas of every piece (and their identical optimizer states) offer the
    same tensors from both ranks: each is written once (DCP's dedup of replicated writes), by
    one of the two ranks, not once per replica."""
    from torch.distributed.checkpoint import FileSystemReader

    spawn(2, _replica_worker, str(tmp_path))
    folder = completed_steps(tmp_path)[-1]
    md = FileSystemReader(str(folder)).read_metadata()
    files = {p.name: p.stat().st_size for p in folder.glob("*.distcp")}
    # every byte of the data files belongs to exactly one indexed chunk: a second copy of a
    # tensor would be bytes that no index entry points at
    assert sum(files.values()) == sum(info.length for info in md.storage_data.values())
    model_keys = [k for k in md.state_dict_metadata if k.startswith("model.")]
    model_chunks = [idx for idx in md.storage_data if idx.fqn.startswith("model.")]
    assert len(model_chunks) == len(model_keys) > 20  # one box per tensor (ep = 1)
    writers = {str(md.storage_data[idx].relative_path) for idx in model_chunks}
    assert writers == set(files) and len(files) == 2  # the replicas split the writing
