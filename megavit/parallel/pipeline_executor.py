"""Running a pipeline schedule: forward and backward passes of model chunks, connected by
point-to-point messages between neighbouring stages.

The executor runs one stage's action list (`megavit.parallel.schedules`). A forward of
chunk c receives its input from the previous stage (unless c is the model's first chunk,
which reads the model's inputs) and sends its output to the next stage (unless c is the last
chunk, which computes the loss). A backward receives the output's gradient from the next
stage (or starts from the loss) and sends its input's gradient back. `messages` says, for
an action, what it receives and sends; shapes are known in advance ([s/t or s, m, h] for a
micro-batch of m samples), so no shape is exchanged.

Each direction between two neighbouring stages has its own communicator
(`ParallelState.pp_channels`): a receive is posted right before its action runs and waited
for; a send is posted (with `batch_isend_irecv`) right after, and waited for at the end of
the step (handles are dropped once complete, so sent tensors are not kept longer). With
NCCL a send occupies its communicator's stream until the peer receives it; because a
channel carries one direction only, in the same order on both ends, this cannot deadlock
(tests/nccl_model.py replays every schedule under those rules). Messages are also tagged by
(direction, micro-batch, chunk) for gloo.

With one stage (P = 1) the schedule is F0 B0 F1 B1 ...: this is also megavit's gradient
accumulation, so every layout runs the same code.

A zero-bubble schedule adds W actions: its B runs backward with the linear layers' weight
gradients deferred (`weight_grad.WeightGradStore`, given as `weight_grads`) and its W
computes them; the micro-batch's activations are counted as held until W.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from megavit.parallel.comm import Group
from megavit.parallel.memory import SavedTensorMeter
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.schedules import Action
from megavit.parallel.weight_grad import WeightGradStore

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


class Message(NamedTuple):
    channel: str   # "act_recv", "act_send", "grad_recv" or "grad_send"
    key: tuple     # ("F", micro-batch, g): the input of global chunk g;
                   # ("B", micro-batch, g): the gradient of global chunk g's input


def messages(action: Action, layout: PipelineLayout, stage: int) -> tuple[Message | None,
                                                                            Message | None]:
    """(what `action` receives before it runs, what it sends after), or None for either (a
    W pass neither receives nor sends)."""
    if action.kind == "W":
        return None, None
    g = layout.global_chunk(stage, action.chunk)
    first, last = layout.is_first(stage, action.chunk), layout.is_last(stage, action.chunk)
    mb = action.micro_batch
    if action.kind == "F":
        return (None if first else Message("act_recv", ("F", mb, g)),
                None if last else Message("act_send", ("F", mb, g + 1)))
    return (None if last else Message("grad_recv", ("B", mb, g + 1)),
            None if first else Message("grad_send", ("B", mb, g)))


class PipelineExecutor:
    """Runs schedules for one pipeline stage (`stage` of `layout`), exchanging messages on
    `channels` (ParallelState.pp_channels; empty with one stage)."""

    def __init__(self, layout: PipelineLayout, stage: int, channels: dict[str, Group],
                 device: torch.device, dtype: torch.dtype = torch.float32,
                 weight_grads: WeightGradStore | None = None) -> None:
        self.layout, self.stage, self.channels = layout, stage, channels
        self.device, self.dtype = device, dtype
        self.weight_grads = weight_grads     # set: the zero-bubble schedule (B / W apart)
        self._sends: list = []
        self._idle = 0.0

    def _tag(self, key: tuple) -> int:
        kind, mb, g = key
        return (mb * self.layout.total_chunks + g) * 2 + int(kind == "B")

    def _receive(self, msg: Message, buffer: torch.Tensor) -> torch.Tensor:
        (work,) = self.channels[msg.channel].exchange([], [(buffer, 0, self._tag(msg.key))])
        start = time.perf_counter()
        work.wait()
        self._idle += time.perf_counter() - start
        return buffer

    def _send(self, msg: Message, tensor: torch.Tensor) -> None:
        self._sends = [w for w in self._sends if not w.is_completed()]
        self._sends += self.channels[msg.channel].exchange([(tensor, 1, self._tag(msg.key))], [])

    def run(self, actions: list[Action], forward: ForwardFn,
            input_shape: Callable[[int, int], tuple],
            loss: LossFn | None = None, forward_only: bool = False,
            meter_exclude: list[torch.Tensor] | None = None) -> StepStats:
        """Run `actions`. `forward(chunk, mb, x, meter)` runs a local chunk (x is None for
        the model's first chunk); on the model's last chunk `loss(mb, output)` gives the
        scalar to back-propagate (with `forward_only`, its return value is ignored).
        `input_shape(mb, chunk)` is the shape of what local chunk `chunk` receives from
        the previous stage for micro-batch `mb`. With `meter_exclude` (the
        parameters and buffers), each forward gets a SavedTensorMeter to enter around what
        it wants measured, and the peak of the measured bytes held at once is returned."""
        layout, stage = self.layout, self.stage
        stash: dict[tuple[int, int], tuple] = {}
        stats, live = StepStats(), 0
        stats.started, self._idle = time.monotonic(), 0.0
        split = any(a.kind == "W" for a in actions)
        if split and self.weight_grads is None:
            raise ValueError("a schedule with W passes needs the executor's weight_grads store")
        for a in actions:
            key = (a.micro_batch, a.chunk)
            if a.kind == "W":
                self.weight_grads.run(key)
                live -= stats.saved_bytes.get(key, 0)
                continue
            recv, send = messages(a, layout, stage)
            last = layout.is_last(stage, a.chunk)
            if a.kind == "F":
                x = None
                if recv is not None:
                    x = self._receive(recv, torch.empty(input_shape(a.micro_batch, a.chunk),
                                                        dtype=self.dtype, device=self.device))
                    x.requires_grad_(not forward_only)
                meter = SavedTensorMeter(meter_exclude) if meter_exclude is not None else None
                with torch.set_grad_enabled(not forward_only):
                    y = forward(a.chunk, a.micro_batch, x, meter)
                    if last and loss is not None:
                        y = loss(a.micro_batch, y)
                if meter is not None:
                    stats.saved_bytes[key] = meter.bytes
                    live += meter.bytes
                    stats.peak_saved_bytes = max(stats.peak_saved_bytes, live)
                if send is not None:
                    self._send(send, y.detach())
                if not forward_only:
                    stash[key] = (x, y)
            else:
                x, y = stash.pop(key)
                grad = None if recv is None else self._receive(recv, torch.empty_like(y))
                with (self.weight_grads.input_gradients_only(key) if split else nullcontext()):
                    torch.autograd.backward(y, grad)
                if send is not None:   # a chunk that ignores its input still answers
                    self._send(send, x.grad if x.grad is not None else torch.zeros_like(x))
                if not split:
                    live -= stats.saved_bytes.get(key, 0)
        start = time.perf_counter()
        for w in self._sends:
            w.wait()
        self._idle += time.perf_counter() - start
        self._sends = []
        stats.ended, stats.idle_seconds = time.monotonic(), self._idle
        return stats
