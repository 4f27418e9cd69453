"""The one error type of checkpoint conversion (bad input: the message names the file and tensor)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is not what the config says it should be."""
