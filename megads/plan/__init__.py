"""Capacity planner: memory, step time and GPU-hours of any layout on any cluster (docs/planner.md).

Sits above `megads.parallel`, `megads.pipeline` and `megads.model` (it imports them; nothing
below imports it): `config` (Hydra schemas, cluster presets), `activations` (saved bytes per
layer type), `estimate` (memory, time, cost of one layout), `search`, `emit`, `plots`, `cli`.
"""
