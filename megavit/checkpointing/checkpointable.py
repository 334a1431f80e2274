"""What a checkpoint reads from and writes into a run: the `Checkpointable` protocol.

The engine's `training.run.Run` is one; checkpointing never imports it (the layers go
down: training -> checkpointing). Saved: the model's parameters, the optimizer's fp32
masters and Adam moments (laid out like the gradient buffer), the loss scaler, the dropout
RNG streams, the run's description (`megavit_config.json`) and the files beside the tensors.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.random import RNGTracker
from megavit.parallel.state import ParallelState


class CheckpointedOptimizer(Protocol):
    """The mixed-precision optimizer's state as checkpoints see it."""

    adamw: torch.optim.Optimizer   # .state[master]: "step", "exp_avg", "exp_avg_sq"
    masters: list[torch.Tensor]    # one fp32 master per segment of this rank
    segments: list[Any]            # each with .buffer_range (start, stop) in the buffer
    separate_masters: bool         # masters are not the (16-bit) parameters themselves

    def copy_masters_to_params(self) -> None: ...


class LossScaler(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Checkpointable(Protocol):
    """A run as `save_checkpoint` / `resume` use it."""

    pstate: ParallelState
    model: nn.Module               # this pipeline stage's part
    buffers: DataParallelBuffers
    optimizer: CheckpointedOptimizer
    scaler: LossScaler | None

    @property
    def rng(self) -> RNGTracker | None: ...

    def describe(self) -> dict[str, Any]:
        """megavit_config.json: "model" (and a two-tower run's "text" and "contrastive"),
        "preprocessing" (the training images', when made from pixels), "layout" and
        "precision"."""

    def checkpoint_files(self) -> dict[str, bytes]:
        """{file name: bytes} saved beside the tensors (e.g. the tokenizer)."""
