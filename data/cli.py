"""Shared command-line helper: a ``DataConfig`` from ``conf/data/<name>.yaml`` plus overrides.

Overrides use Hydra's ``key=value`` syntax (``data.`` prefix optional), e.g.
``python -m tools.prepare_data vocab_size=4096 cache_dir=/tmp/cache``; values are parsed by
OmegaConf and checked against the dataclass, so a misspelt key fails with its name.
"""

from __future__ import annotations

from pathlib import Path

from megads.data.config import DataConfig
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "data"


def config_from_overrides(overrides: list[str], *, preset: str = "builtin") -> DataConfig:
    """Structured ``DataConfig`` = dataclass defaults <- preset YAML <- overrides; validated."""
    base = OmegaConf.structured(DataConfig)
    yaml = CONF_DIR / f"{preset}.yaml"
    if not yaml.is_file():
        raise ValueError(f"{yaml}: no such data preset; choose one of {sorted(p.stem for p in CONF_DIR.glob('*.yaml'))}")
    cleaned = []
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. vocab_size=4096)")
        key, value = item.split("=", 1)
        cleaned.append(f"{key.removeprefix('data.').lstrip('+')}={value}")
    try:
        merged = OmegaConf.merge(base, OmegaConf.load(yaml), OmegaConf.from_dotlist(cleaned))
    except Exception as err:  # OmegaConf names the bad key / value
        raise ValueError(f"bad data config override: {err}") from err
    cfg: DataConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    cfg.validate()
    return cfg
