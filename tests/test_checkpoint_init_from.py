"""`checkpoint.init_from` into pp2 x ep2 (4 gloo ranks): from an HF folder (each rank reads only
its tensors) and from a `megads-convert from-hf` folder, every rank's parameters equal the
matching slice of the single-process `from_hf` model bit for bit, and the first step's loss
(the forward of those weights through the pipeline) equals the single-process loss."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

import megads
from megads.convert.checkpoint import convert_from_hf
from megads.convert.hf import read_hf_config
from megads.model.config import ModelConfig
from megads.parallel.executor import OptimSettings, ParallelExecutor
from megads.parallel.mesh import ParallelMesh, plan_layout
from megads.testing.parallel import make_batches, spawn
from megads.train.trainer import init_weights_from

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_conversion import make_hf_model  # noqa: E402

MTP_WEIGHT = 0.3


def _worker(rank: int, world: int, cfg: ModelConfig, sources: list[str], batch: tuple, outdir: str) -> None:
    warnings.simplefilter("ignore")
    plan = plan_layout(world_size=world, pp=2, ep=2, num_layers=cfg.num_hidden_layers,
                       n_routed_experts=cfg.n_routed_experts, n_group=cfg.n_group, topk_group=cfg.topk_group)
    for i, source in enumerate(sources):
        ex = ParallelExecutor(cfg, mesh=ParallelMesh.build(plan), plan=plan, micro_batch_size=1,
                              optim=OptimSettings(lr=0.0, weight_decay=0.0), init=False)
        kind = init_weights_from(source, ex)
        params = {n: (t.clone(), s) for n, (t, s) in ex.global_named_parameters().items()}
        m = ex.step(*batch, mtp_weight=MTP_WEIGHT)
        torch.save({"kind": kind, "params": params, "loss": m.loss}, Path(outdir) / f"{i}.rank{rank}.pt")


def test_init_from_hf_and_converted_folders_into_pp2_ep2(tmp_path: Path) -> None:
    warnings.simplefilter("ignore")
    make_hf_model(11).save_pretrained(tmp_path / "transformers")
    ref = megads.from_hf(tmp_path / "transformers", init_missing_mtp=True)
    megads.to_hf(ref, tmp_path / "hf")
    convert_from_hf(tmp_path / "hf", tmp_path / "dcp")
    cfg = read_hf_config(tmp_path / "hf")
    ids, labels = make_batches(cfg, steps=1, global_batch=4, seq_len=12)[0]
    with torch.no_grad():
        losses = [float(ref.compute_loss(ids[i:i + 1], labels[i:i + 1], mtp_weight=MTP_WEIGHT).total) for i in range(4)]
    ref_loss = sum(losses) / len(losses)
    spawn(4, _worker, cfg, [str(tmp_path / "hf"), str(tmp_path / "dcp")], (ids, labels), str(tmp_path))
    full = ref.state_dict()
    for i, kind in enumerate(("Hugging Face checkpoint", "megads checkpoint")):
        seen = set()
        for r in range(4):
            res = torch.load(tmp_path / f"{i}.rank{r}.pt", weights_only=False)
            assert res["kind"] == kind
            assert abs(res["loss"] - ref_loss) <= 1e-6 * abs(ref_loss), (kind, res["loss"], ref_loss)
            for name, (t, start) in res["params"].items():
                want = full[name][start:start + t.shape[0]] if ".experts." in name else full[name]
                assert torch.equal(t, want), (kind, r, name)
                seen.add(name)
        assert seen == {n for n, _ in ref.named_parameters()}  # every parameter is held somewhere
