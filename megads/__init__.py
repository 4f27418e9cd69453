"""megads: 3D-parallel pretraining of DeepSeek-V3-class mixture-of-experts models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from megads.model import DeepseekV3


def from_hf(path: str, **kwargs: Any) -> DeepseekV3:
    """Load a Hugging Face DeepSeek-V3 checkpoint folder into a megads model (see megads.convert.hf)."""
    from megads.convert.hf import from_hf as _from_hf

    return _from_hf(path, **kwargs)


def to_hf(model: DeepseekV3, path: str, **kwargs: Any) -> None:
    """Save a megads model as a Hugging Face DeepSeek-V3 checkpoint folder (see megads.convert.hf)."""
    from megads.convert.hf import to_hf as _to_hf

    _to_hf(model, path, **kwargs)
