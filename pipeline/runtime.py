"""The runtime: executes one rank's action list of a `Schedule` on real `torch.distributed` ranks.

Communication: SEND/RECV actions are only queued (as `dist.P2POp`); the queue is committed with
one `dist.batch_isend_irecv` when the rank reaches its next compute action, so transfers run
asynchronously under the compute. A compute action waits only for the receives it consumes;
send handles are kept (with their tensors alive) until the end of the step. Every piece of
per-step state (receive buffers, hand-offs between chunks of this rank, the send queue, losses,
the live-activation count) lives in the runtime instance and is reset by each `step`.

Loss scaling: the backward of a path's last chunk starts from grad_y = 1/M (M micro-batches), so
the summed gradients are those of the mean micro-batch loss.

Order of operations inside a step: begin_step -> actions in order -> wait for outstanding sends
-> stage.sync_replica_grads() -> stage.end_step().
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from megads.pipeline.actions import Action, Op, Schedule
from megads.pipeline.stage import BackwardArgs, ForwardArgs, PipelineStage
from megads.pipeline.validate import validate


@dataclass
class StepResult:
    """What one rank saw during a step."""

    losses: dict[int, torch.Tensor]
    num_microbatches: int
    timeline: list[tuple[Action, float, float]] = field(default_factory=list)
    busy_s: float = 0.0
    wall_s: float = 0.0
    peak_live: int = 0
    t0: float = 0.0  # time.perf_counter() at the start of the step (timeline times are relative to it)
    sent_bytes: int = 0  # activation and gradient bytes this rank sent point-to-point (their dtype decides)

    @property
    def loss(self) -> torch.Tensor | None:
        """Sum of this rank's micro-batch losses / M (the global mean when one rank holds all)."""
        if not self.losses:
            return None
        return torch.stack([self.losses[m] for m in sorted(self.losses)]).sum() / self.num_microbatches


class PipelineRuntime:
    """Runs `schedule`'s actions of pipeline rank `rank` on `stage`.

    `group` is the pipeline process group (None: the default group, pipeline rank = global
    rank). The schedule is validated once at construction unless `check=False`.
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        stage: PipelineStage,
        rank: int,
        group: dist.ProcessGroup | None = None,
        check: bool = True,
        record_timeline: bool = False,
    ) -> None:
        if not 0 <= rank < schedule.pp:
            raise ValueError(f"pipeline rank {rank} outside the schedule's pp={schedule.pp}")
        world = dist.get_world_size(group)
        if world != schedule.pp:
            raise ValueError(
                f"the pipeline group has {world} ranks but the schedule has pp={schedule.pp}; "
                "pass group= the pipeline process group of this rank (None means the whole world)"
            )
        if check:
            validate(schedule)
        self.schedule = schedule
        self.stage = stage
        self.rank = rank
        self.group = group
        self.record_timeline = record_timeline
        self.actions: tuple[Action, ...] = schedule.actions[rank]
        self._global = [
            dist.get_global_rank(group, r) if group is not None else r for r in range(schedule.pp)
        ]
        self._reset()

    # ------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._ops: list[dist.P2POp] = []
        self._op_keys: list[tuple[str, int, int] | None] = []
        self._recv: dict[tuple[str, int, int], tuple[torch.Tensor, list[Any]]] = {}
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        self._grads: dict[tuple[int, int], torch.Tensor] = {}
        self._to_send: dict[tuple[str, int, int], torch.Tensor] = {}
        self._send_works: list[tuple[Any, torch.Tensor]] = []
        self._losses: dict[int, torch.Tensor] = {}
        self._live = 0
        self._peak_live = 0
        self._sent_bytes = 0

    def _queue(self, act: Action) -> None:
        peer = self._global[act.peer]
        if act.op is Op.RECV_F:
            meta = self.stage.input_meta(act.chunk, act.mb)
            key = ("F", act.chunk, act.mb)
        elif act.op is Op.RECV_B:
            meta = self.stage.output_meta(act.chunk, act.mb)
            key = ("B", act.chunk, act.mb)
        else:
            key = ("F" if act.op is Op.SEND_F else "B", act.chunk, act.mb)
            tensor = self._to_send.pop(key)
            self._sent_bytes += tensor.numel() * tensor.element_size()
            self._ops.append(dist.P2POp(dist.isend, tensor, peer, self.group))
            self._op_keys.append(None)
            return
        buf = torch.empty(meta.shape, dtype=meta.dtype, device=self.stage.device)
        self._ops.append(dist.P2POp(dist.irecv, buf, peer, self.group))
        self._op_keys.append(key)
        self._recv[key] = (buf, [])

    def _commit(self) -> None:
        if not self._ops:
            return
        works = dist.batch_isend_irecv(self._ops)
        if len(works) == len(self._ops):
            per_op = [[w] for w in works]
        else:  # a backend that returns one handle for the whole coalesced batch
            per_op = [list(works) for _ in self._ops]
        for op, key, ws in zip(self._ops, self._op_keys, per_op):
            if key is None:
                self._send_works.append((ws, op.tensor))
            else:
                self._recv[key][1].extend(ws)
        self._ops, self._op_keys = [], []

    def _take_recv(self, key: tuple[str, int, int]) -> torch.Tensor:
        buf, works = self._recv.pop(key)
        for w in works:
            w.wait()
        return buf

    # ------------------------------------------------------------------------------------------
    def _input_of(self, chunk: int, mb: int) -> torch.Tensor | None:
        info = self.schedule.layout.chunks[chunk]
        if info.prev is None:
            return None
        if ("F", chunk, mb) in self._recv:
            return self._take_recv(("F", chunk, mb))
        return self._inputs.pop((chunk, mb))

    def _grad_of(self, chunk: int, mb: int) -> torch.Tensor:
        if ("B", chunk, mb) in self._recv:
            return self._take_recv(("B", chunk, mb))
        return self._grads.pop((chunk, mb))

    def _after_forward(self, chunk: int, mb: int, y: torch.Tensor) -> None:
        info = self.schedule.layout.chunks[chunk]
        self._live += 1
        self._peak_live = max(self._peak_live, self._live)
        y = y.detach()
        if info.next is None:
            self._losses[mb] = y
            self._grads[(chunk, mb)] = torch.ones_like(y) / self.schedule.num_microbatches
        elif self.schedule.layout.chunks[info.next].rank == self.rank:
            self._inputs[(info.next, mb)] = y
        else:
            self._to_send[("F", chunk, mb)] = y.contiguous()

    def _after_backward(self, chunk: int, mb: int, grad_x: torch.Tensor | None) -> None:
        info = self.schedule.layout.chunks[chunk]
        if info.prev is None:
            return
        assert grad_x is not None, f"stage returned no input gradient for chunk {chunk} mb {mb}"
        grad_x = grad_x.detach()
        if self.schedule.layout.chunks[info.prev].rank == self.rank:
            self._grads[(info.prev, mb)] = grad_x
        else:
            self._to_send[("B", chunk, mb)] = grad_x.contiguous()

    def _fetch(self, act: Action) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Inputs of a compute action (waits for their receives): (x of the F part, grad_y of the B part)."""
        x = g = None
        for part in act.parts:  # in order: an F&B pair takes its F part's input first
            if part.op is Op.F:
                x = self._input_of(part.chunk, part.mb)
            elif part.op in (Op.B, Op.BW):
                g = self._grad_of(part.chunk, part.mb)
        return x, g

    def _compute(self, act: Action, x: torch.Tensor | None, g: torch.Tensor | None) -> None:
        st = self.stage
        if act.op is Op.F:
            self._after_forward(act.chunk, act.mb, st.forward(act.chunk, act.mb, x))
        elif act.op is Op.B:
            assert g is not None
            self._after_backward(act.chunk, act.mb, st.backward_input(act.chunk, act.mb, g))
        elif act.op is Op.W:
            st.backward_weight(act.chunk, act.mb)
            self._live -= 1
        elif act.op is Op.BW:
            assert g is not None
            self._after_backward(act.chunk, act.mb, st.backward_full(act.chunk, act.mb, g))
            self._live -= 1
        elif act.op is Op.FB:
            assert g is not None
            f, b = act.parts
            y, gx = st.forward_backward_overlapped(
                ForwardArgs(f.chunk, f.mb, x), BackwardArgs(b.chunk, b.mb, g)
            )
            self._after_forward(f.chunk, f.mb, y)
            self._after_backward(b.chunk, b.mb, gx)
            self._live -= 1
        else:  # pragma: no cover - comm ops never reach here
            raise AssertionError(act)

    def step(self, microbatches: Sequence[Any] | None = None) -> StepResult:
        """Run one training step (forward and backward of every micro-batch); returns this rank's view."""
        self._reset()
        m_total = self.schedule.num_microbatches
        if microbatches is not None and len(microbatches) != m_total:
            raise ValueError(f"step got {len(microbatches)} micro-batches, the schedule expects {m_total}")
        self.stage.begin_step(microbatches=microbatches, num_microbatches=m_total)
        timeline: list[tuple[Action, float, float]] = []
        busy = 0.0
        t0 = time.perf_counter()
        for act in self.actions:
            if act.op.is_comm:
                self._queue(act)
                continue
            self._commit()
            x, g = self._fetch(act)
            start = time.perf_counter()
            self._compute(act, x, g)
            end = time.perf_counter()
            busy += end - start
            if self.record_timeline:
                timeline.append((act, start - t0, end - t0))
        self._commit()
        for works, _ in self._send_works:
            for w in works or ():
                w.wait()
        assert not self._recv and not self._to_send, (list(self._recv), list(self._to_send))
        assert self._live == 0, self._live
        wall = time.perf_counter() - t0
        self.stage.sync_replica_grads()
        self.stage.end_step()
        result = StepResult(
            losses=dict(self._losses),
            num_microbatches=m_total,
            timeline=timeline,
            busy_s=busy,
            wall_s=wall,
            peak_live=self._peak_live,
            t0=t0,
            sent_bytes=self._sent_bytes,
        )
        self._reset()
        return result
