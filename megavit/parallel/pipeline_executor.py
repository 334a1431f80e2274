"""Running a pipeline schedule: forward and backward passes of model chunks, connected by
point-to-point messages on the pipeline group.

The executor runs one stage's action list (`megavit.parallel.schedules`). A forward of
chunk c receives its input from the previous stage (unless c is the model's first chunk,
which reads the images), and sends its output to the next stage (unless c is the last
chunk, which computes the loss). A backward receives the output's gradient from the next
stage (or starts from the loss) and sends its input's gradient back. Shapes are known in
advance ([s/t or s, m, h] for a micro-batch of m images), so no shape is exchanged.

Messages are tagged with (direction, micro-batch, receiving chunk), so they match whatever
order the stages post them in. The sends an action produces are posted together with the
receive the next action needs, in one `batch_isend_irecv` (Megatron's send-forward-
receive-backward), and waited for at the end of the step.

With one stage (P = 1) the schedule is F0 B0 F1 B1 ...: this is also megavit's gradient
accumulation, so every layout runs the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from megavit.parallel.comm import Group
from megavit.parallel.memory import SavedTensorMeter
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.schedules import Action

# (chunk, mb, input or None, meter or None) -> output; enter the meter around what to measure
ForwardFn = Callable[[int, int, "torch.Tensor | None", "SavedTensorMeter | None"], torch.Tensor]
LossFn = Callable[[int, torch.Tensor], torch.Tensor]                     # (mb, output) -> loss


@dataclass
class StepStats:
    """What a run measured: saved bytes per forward and the peak held at once (when
    metered), the run's wall time and the part of it spent waiting for messages."""

    saved_bytes: dict[tuple[int, int], int] = field(default_factory=dict)
    peak_saved_bytes: int = 0
    started: float = 0.0       # time.monotonic(): comparable between processes of a host
    ended: float = 0.0
    idle_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class PipelineExecutor:
    """Runs schedules for one pipeline stage (`stage` of `layout`, communicating on `pp`)."""

    def __init__(self, layout: PipelineLayout, stage: int, pp: Group,
                 device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.layout, self.stage, self.pp = layout, stage, pp
        self.device, self.dtype = device, dtype
        P = layout.stages
        self.prev, self.next = (stage - 1) % P, (stage + 1) % P
        self._sends: list[tuple[torch.Tensor, int, int]] = []
        self._works: list = []
        self._idle = 0.0

    def _tag(self, backward: bool, mb: int, g: int) -> int:
        """A message's tag: (direction, micro-batch, global chunk g). Forward: the input of
        chunk g; backward: the gradient of chunk g's input."""
        return (mb * self.layout.total_chunks + g) * 2 + int(backward)

    def _post(self, recv: tuple[torch.Tensor, int, int] | None = None) -> None:
        """Post the pending sends, and `recv` with them; wait for `recv` only."""
        works = self.pp.exchange(self._sends, [recv] if recv else [])
        self._works += works[:len(self._sends)]
        self._sends = []
        if recv:
            start = time.perf_counter()
            works[-1].wait()
            self._idle += time.perf_counter() - start

    def run(self, actions: list[Action], forward: ForwardFn, input_shape: Callable[[int], tuple],
            loss: LossFn | None = None, forward_only: bool = False,
            meter_exclude: list[torch.Tensor] | None = None) -> StepStats:
        """Run `actions`. `forward(chunk, mb, x, meter)` runs a local chunk (x is None for
        the model's first chunk); on the model's last chunk `loss(mb, output)` gives the
        scalar to back-propagate (with `forward_only`, its return value is ignored).
        `input_shape(mb)` is the activation shape between stages. With `meter_exclude` (the
        parameters and buffers), each forward gets a SavedTensorMeter to enter around what
        it wants measured, and the peak of the measured bytes held at once is returned."""
        layout, stage = self.layout, self.stage
        stash: dict[tuple[int, int], tuple] = {}
        stats, live = StepStats(), 0
        stats.started, self._idle = time.monotonic(), 0.0
        for a in actions:
            first, last = layout.is_first(stage, a.chunk), layout.is_last(stage, a.chunk)
            key, g = (a.micro_batch, a.chunk), layout.global_chunk(stage, a.chunk)
            if a.kind == "F":
                x = None
                if not first:
                    x = torch.empty(input_shape(a.micro_batch), dtype=self.dtype, device=self.device)
                    self._post((x, self.prev, self._tag(False, a.micro_batch, g)))
                    x.requires_grad_(not forward_only)
                else:
                    self._post()
                meter = SavedTensorMeter(meter_exclude) if meter_exclude is not None else None
                with torch.set_grad_enabled(not forward_only):
                    y = forward(a.chunk, a.micro_batch, x, meter)
                    if last and loss is not None:
                        y = loss(a.micro_batch, y)
                if meter is not None:
                    stats.saved_bytes[key] = meter.bytes
                    live += meter.bytes
                    stats.peak_saved_bytes = max(stats.peak_saved_bytes, live)
                if not last:
                    self._sends.append((y.detach(), self.next, self._tag(False, a.micro_batch, g + 1)))
                if not forward_only:
                    stash[key] = (x, y)
            else:
                x, y = stash.pop(key)
                if last:
                    self._post()
                    torch.autograd.backward(y)
                else:
                    dy = torch.empty_like(y)
                    self._post((dy, self.next, self._tag(True, a.micro_batch, g + 1)))
                    torch.autograd.backward(y, dy)
                if not first:
                    self._sends.append((x.grad, self.prev, self._tag(True, a.micro_batch, g)))
                live -= stats.saved_bytes.get(key, 0)
        self._post()
        start = time.perf_counter()
        for w in self._works:
            w.wait()
        self._idle += time.perf_counter() - start
        self._works = []
        stats.ended, stats.idle_seconds = time.monotonic(), self._idle
        return stats
