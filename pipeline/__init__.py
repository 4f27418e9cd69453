"""Pipeline-parallel schedules for megads: one action language, a registry of
generators (five built in), one runtime.

    from megads.pipeline import build_schedule, PipelineRuntime, ModuleStage, validate
    sched = build_schedule("dualpipev", pp=4, num_microbatches=8)   # validated per-rank action lists
    runtime = PipelineRuntime(sched, stage=stage, rank=pp_rank, group=pp_group)
    result = runtime.step(microbatches)

See docs/pipeline.md for the language, the schedules and their bubbles, the stage protocol and
how a model plugs in.
"""

from megads.pipeline.actions import Action, ChunkInfo, Costs, Layout, Op, Schedule
from megads.pipeline.module_stage import ModuleStage
from megads.pipeline.runtime import PipelineRuntime, StepResult
from megads.pipeline.schedules import (
    SCHEDULES,
    ScheduleSpec,
    analytic_bubble,
    build_schedule,
    get_schedule,
    min_microbatches,
    register_schedule,
    schedule_names,
)
from megads.pipeline.stage import BackwardArgs, ForwardArgs, PipelineStage, StageBase, TensorMeta
from megads.pipeline.validate import ScheduleError, SimResult, check_spec, simulate, validate

__all__ = [
    "SCHEDULES",
    "Action",
    "BackwardArgs",
    "ChunkInfo",
    "Costs",
    "ForwardArgs",
    "Layout",
    "ModuleStage",
    "Op",
    "PipelineRuntime",
    "PipelineStage",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "SimResult",
    "StageBase",
    "StepResult",
    "TensorMeta",
    "analytic_bubble",
    "build_schedule",
    "check_spec",
    "get_schedule",
    "min_microbatches",
    "register_schedule",
    "schedule_names",
    "simulate",
    "validate",
]
