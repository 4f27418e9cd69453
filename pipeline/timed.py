"""Timed stages for measuring schedules: every chunk's F, B and W cost a fixed sleep.

`SleepChunk` is an `nn.Module` whose forward sleeps `f_s` and whose autograd graph has two
branches: y = SleepGrad(x, b_s) + SleepGrad(weight, w_s). A gradient with respect to the input
(B) walks only the first branch and sleeps b_s; a gradient with respect to the weight (W) walks
only the second and sleeps w_s; a full backward sleeps both. Because it is an ordinary module, the
same chunk runs under our `ModuleStage` and under `torch.distributed.pipelining`, so the
schedules, not the CPU, set the wall time (sleeping ranks use no CPU, so 8 ranks fit on 2 cores).

`OverlappingModuleStage` is a ModuleStage whose F&B runs the forward of one micro-batch and the
full backward of another on two threads, so with sleeping chunks an F&B pair costs max(F, B+W)
instead of the sum: the schedule-level effect of a model that overlaps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from megads.pipeline.module_stage import ModuleStage
from megads.pipeline.stage import BackwardArgs, ForwardArgs
from torch import nn


class SleepGrad(torch.autograd.Function):
    """Identity whose backward sleeps `seconds`."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, seconds: float) -> torch.Tensor:
        ctx.seconds = seconds
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        time.sleep(ctx.seconds)
        return grad, None


class SleepChunk(nn.Module):
    """A chunk costing f_s forward, b_s input-gradient and w_s weight-gradient seconds."""

    def __init__(self, *, f_s: float, b_s: float, w_s: float, width: int = 4) -> None:
        super().__init__()
        self.f_s, self.b_s, self.w_s = f_s, b_s, w_s
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x_NW: torch.Tensor) -> torch.Tensor:
        time.sleep(self.f_s)
        return SleepGrad.apply(x_NW, self.b_s) + SleepGrad.apply(self.weight, self.w_s)


class OverlappingModuleStage(ModuleStage):
    """A ModuleStage whose F&B runs the forward and the full backward concurrently (two threads).

    Only meaningful for chunks that release the GIL while they work (sleeps, or GPU kernels on
    separate streams); it demonstrates the schedule-level gain of a model that overlaps.
    """

    def forward_backward_overlapped(
        self, f: ForwardArgs, b: BackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        import threading

        out: dict[str, torch.Tensor | None] = {}

        def run_backward() -> None:
            out["gx"] = self.backward_full(b.chunk, b.mb, b.grad_y)

        th = threading.Thread(target=run_backward)
        th.start()
        y = self.forward(f.chunk, f.mb, f.x)
        th.join()
        return y, out["gx"]
