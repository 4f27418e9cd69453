"""Choosing and typing the data source of a run (Hydra group `data`).

`data` is untyped in the root schema because two sources exist: the data pipeline
(`data.config.DataConfig`, loader `data.loader.build_train_loader`; preset `data=builtin`) and
the byte-level fallback of this package (`data=fallback`, marked by `kind: fallback`).
`resolve_data_config` merges the composed node into the right dataclass (unknown keys fail)
and validates it; `build_loader` builds this rank's loader. Both run before training starts.
"""

from __future__ import annotations

from typing import Any

from megads.train.config import ConfigError
from megads.train.fallback_data import FallbackDataConfig, build_fallback_loader


def resolve_data_config(raw: Any, *, check_paths: bool = False) -> Any:
    """The typed, validated data config of a composed `data` node.

    `check_paths` also requires every configured input (sources, tokenizer, fallback root) to
    exist: the trainer asks for it before any process group starts, a dry-run validation of a
    cluster recipe on another machine does not.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(raw, DictConfig):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = dict(raw or {})
    if not raw:
        raise ConfigError("data: no data source configured; choose one with data=builtin or data=fallback")
    if raw.get("kind") == "fallback":
        schema: type = FallbackDataConfig
    else:
        try:
            from megads.data.config import DataConfig
        except ImportError as e:
            raise ConfigError(
                f"data: this source needs the data pipeline package (`data.config`), which failed to import "
                f"({e}); use data=fallback for the byte-level built-in source"
            ) from None
        schema = DataConfig
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw))
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid data config ({schema.__name__}): {e}") from None
    try:
        obj.validate()
    except ValueError as e:
        raise ConfigError(f"invalid data config: {e}") from None
    if getattr(obj, "return_document_boundaries", False):
        raise ConfigError(
            "data.return_document_boundaries=true: the trainer packs documents without a cross-document "
            "attention mask (the DeepSeek-V3 recipe), so the boundaries would be ignored; set it to false "
            "(the data pipeline's loader still returns them to other callers)"
        )
    if check_paths:
        _check_input_paths(obj)
    return obj


def _check_input_paths(obj: Any) -> None:
    """Every configured input exists (ConfigError naming the field and the path otherwise)."""
    from pathlib import Path

    named: list[tuple[str, Any]] = []
    if isinstance(obj, FallbackDataConfig):
        named.append(("data.root", obj.root))
    else:
        named.append(("data.tokenizer", obj.tokenizer))
        named += [(f"data.sources[{i}].path", src.path) for i, src in enumerate(obj.sources)]
    missing = [f"{field}={path!r} ({Path(path).expanduser().absolute()})" for field, path in named
               if path is not None and not Path(path).expanduser().exists()]
    if missing:
        raise ConfigError(
            "data: these inputs do not exist:\n    " + "\n    ".join(missing)
            + "\n  fix the paths (relative ones are read from the launch folder), or use the built-in corpus "
            "with data=builtin"
        )


def build_loader(data_cfg: Any, *, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Any:
    """This rank's iterator of {"input_ids", "labels"} micro-batches (with state_dict/load_state_dict)."""
    kw = dict(seq_len=seq_len, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    if isinstance(data_cfg, FallbackDataConfig):
        return build_fallback_loader(data_cfg, **kw)
    from megads.data.loader import build_train_loader

    return build_train_loader(data_cfg, **kw)
