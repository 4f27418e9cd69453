"""The megads trainer: Hydra configs, schedules, the step executor, checkpoints and logging.

Entry point: `megads-train` / `python -m megads.train.cli` (see docs/training.md).
"""
