"""What a launch refuses before any process group starts, and settings nobody honours.

Issue 9: a nonexistent data path, an unwritable run folder and a layout change on resume were
reported only after the process group and the model were built; a resume silently kept the
checkpoint's optimizer settings; keys such as `optim.fused` and
`data.return_document_boundaries` were accepted and ignored. `train()` runs in this process
with `init_distributed` replaced by a function that fails the test: every refusal must come
before it.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import megads.train.trainer as trainer_mod
from megads.train.config import (
    ConfigError,
    TrainConfig,
    register_configs,
    register_resolvers,
    to_train_config,
)
from megads.train.preflight import checkpoint_meta, run_fingerprint
from megads.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SMALL = ["model=tiny", "seq_len=32", "parallel=single", "schedule=tiny", "schedule.train_steps=2", "schedule.warmup_steps=1", "schedule.batch_start=2",
         "schedule.batch_end=2", "schedule.batch_ramp_tokens=0", "logging.wandb.mode=disabled"]


FALLBACK = ("data=fallback", "data.max_bytes=200000")


def _compose(*overrides: str) -> TrainConfig:
    from hydra import compose, initialize_config_dir

    if not any(o.startswith("data=") for o in overrides):
        overrides = (*FALLBACK, *overrides)
    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return to_train_config(compose(config_name="config", overrides=list(overrides)))


@pytest.fixture
def no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(**_: Any) -> None:
        raise AssertionError("the launch reached init_distributed: the error came too late")

    monkeypatch.setattr(trainer_mod, "init_distributed", refuse)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_missing_data_path_is_refused_before_the_process_group(no_process_group: None, tmp_path: Path) -> None:
    cfg = _compose(*SMALL, "data=builtin", "+data.sources=[{path: /nonexistent/corpus}]",
                   f"run_dir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path='/nonexistent/corpus'"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_unwritable_run_folder_is_refused_before_the_process_group(no_process_group: None) -> None:
    cfg = _compose(*SMALL, "run_dir=/proc/megads-run")
    with pytest.raises(ConfigError, match="the run folder /proc/megads-run cannot be written"):
        train(cfg)


def _fake_checkpoint(run_dir: Path, cfg: TrainConfig, *, world_size: int = 1) -> Path:
    """A completed step folder whose meta.json describes `cfg` (the state files are not needed:
    every check below must refuse before anything is loaded)."""
    from megads.checkpoint.dcp import commit_folder
    from megads.train.data_source import resolve_data_config

    tmp = run_dir / "checkpoints" / "step_00000002.tmp"
    tmp.mkdir(parents=True)
    (tmp / ".metadata").write_bytes(b"not read: every refusal comes first")
    meta = {"step": 2, "tokens": 64.0, "world_size": world_size,
            "fingerprint": run_fingerprint(cfg, resolve_data_config(cfg.data)),
            **checkpoint_meta(cfg, world_size=world_size)}
    step = run_dir / "checkpoints" / "step_00000002"
    commit_folder(tmp, step, meta=meta)
    return step


def test_layout_change_on_resume_passes_and_is_logged(
    no_process_group: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """State is stored by global name (docs/checkpoints.md): a new layout reshards on load, so the
    preflight lets it through and says what moved (issue 11 replaced the refusal of issue 9)."""
    run = tmp_path / "run"
    saved = _compose(*SMALL, f"run_dir={run}")
    _fake_checkpoint(run, dataclasses.replace(saved, parallel=dataclasses.replace(saved.parallel, zero1=True)))
    cfg = dataclasses.replace(saved, parallel=dataclasses.replace(saved.parallel, zero1=False))
    with caplog.at_level("INFO", logger="megads.train"), pytest.raises(AssertionError, match="reached init_distributed"):
        train(cfg)
    assert "parallel layout changed, the state is resharded on load: zero1 True -> False" in caplog.text


def test_changed_optimizer_settings_are_refused_unless_allowed(no_process_group: None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _fake_checkpoint(run, _compose(*SMALL, f"run_dir={run}"))
    changed = ("optim.weight_decay=5.0", "optim.betas=[0.5,0.6]", "optim.eps=1e-2")
    with pytest.raises(ConfigError) as e:
        train(_compose(*SMALL, f"run_dir={run}", *changed))
    for fragment in ("optim.weight_decay: 0.1 -> 5.0", "optim.betas: [0.9, 0.95] -> [0.5, 0.6]",
                     "optim.eps: 1e-08 -> 0.01", "checkpoint.allow_changed_settings=true"):
        assert fragment in str(e.value)
    # the run length may change (extending a run), and allowed changes pass the preflight
    with pytest.raises(AssertionError, match="reached init_distributed"):
        train(_compose(*SMALL, f"run_dir={run}", "schedule.train_steps=9"))
    with pytest.raises(AssertionError, match="reached init_distributed"):
        train(_compose(*SMALL, f"run_dir={run}", *changed, "checkpoint.allow_changed_settings=true"))


def test_document_boundaries_are_refused_not_ignored(no_process_group: None) -> None:
    cfg = _compose(*SMALL, "data=builtin", "data.return_document_boundaries=true")
    with pytest.raises(ConfigError, match="return_document_boundaries=true: the trainer packs documents"):
        train(cfg)


def test_optim_fused_is_not_a_setting() -> None:
    """ZeRO-1 always runs the fused kernel; a switch that cannot act must not exist."""
    with pytest.raises(Exception, match="Could not override 'optim.fused'"):
        _compose(*SMALL, "optim.fused=false")


# ------------------------------------------------------------------ no setting is ignored


def _leaf_fields(cls: type, prefix: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            out += _leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.name))
    return out


def _attribute_reads() -> set[str]:
    """Every attribute name the product code reads (`x.name` in a load context or getattr)."""
    reads: set[str] = set()
    for root in ("megads", "data", "pipeline"):
        for path in (REPO / root).rglob("*.py"):
            if "testing" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                    reads.add(node.attr)
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                      and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)):
                    reads.add(str(node.args[1].value))
    return reads


def test_every_config_field_is_read_by_the_code() -> None:
    """Walk the whole schema (the trainer's groups and both data sources): a field no code
    reads is a setting that is accepted and ignored."""
    from megads.data.config import DataConfig, DataSourceConfig

    from megads.train.fallback_data import FallbackDataConfig

    fields = _leaf_fields(TrainConfig, "")
    fields += _leaf_fields(DataConfig, "data.") + _leaf_fields(DataSourceConfig, "data.sources[].")
    fields += _leaf_fields(FallbackDataConfig, "data.")
    # read only by the HF export (ModelConfig.to_hf_dict writes every field into config.json)
    exported = {"model.bos_token_id"}
    reads = _attribute_reads()
    unread = sorted(path for path, name in fields if name not in reads and path not in exported)
    assert not unread, f"config fields no code reads (make them act, refuse them, or remove them): {unread}"


def test_the_step_has_no_ignored_arguments() -> None:
    """`loss_scale` was accepted by the executor's run() and ignored: the step takes only what it uses."""
    import inspect

    from megads.parallel.executor import ParallelExecutor

    params = inspect.signature(ParallelExecutor.run).parameters
    assert set(params) == {"self", "micro_batches", "lr", "mtp_weight", "bias_update_speed"}


# Import layers, lowest first: a package may import its own modules and those of the packages
# listed for it, nothing above. `pipeline/` and `data/` are installed as megads.pipeline and
# megads.data (pyproject's package-dir), and never imported under their bare folder names.
LAYERS = {
    "megads.pipeline": ("pipeline", ()),
    "megads.data": ("data", ()),
    "megads.model": ("megads/model", ()),
    "megads.parallel": ("megads/parallel", ("megads.model", "megads.pipeline")),
    "megads.checkpoint": ("megads/checkpoint", ("megads.model", "megads.parallel")),
    "megads.convert": ("megads/convert", ("megads.model", "megads.parallel", "megads.checkpoint")),
}


def test_imports_point_downward() -> None:
    """train -> parallel -> model; pipeline and data below; nothing imports back up."""
    bad = []
    for path in [*REPO.glob("megads/**/*.py"), *REPO.glob("pipeline/**/*.py"), *REPO.glob("data/**/*.py"),
                 *REPO.glob("tools/**/*.py"), *REPO.glob("tests/**/*.py")]:
        rel = path.relative_to(REPO).as_posix()
        layer = next((name for name, (folder, _) in LAYERS.items() if rel.startswith(folder + "/")), None)
        allowed = (layer, *LAYERS[layer][1]) if layer else ()
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                top = n.split(".")[0]
                if top in ("pipeline", "data"):
                    bad.append(f"{rel} imports {n} (use megads.{n})")
                elif layer and top == "megads" and n != "megads" and not any(
                        n == a or n.startswith(a + ".") for a in allowed):
                    bad.append(f"{rel} ({layer}) imports {n}")
    assert not bad, bad
