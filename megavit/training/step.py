"""One optimizer step: forward/backward over this rank's micro-batches, data-parallel
gradient averaging, global-norm clipping, AdamW.

    for each micro-batch m of the M on this DP rank:   loss_m / M, backward (accumulate)
    sum partial gradients over TP (QK-norm weights)    (one all-reduce on the tp group)
    average gradients over DP                          (one all-reduce on the dp group)
    clip to --clip-grad by the global norm             (one all-reduce on the tp group)
    AdamW step on this rank's shards

The gradient is that of the mean loss over the global batch, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megavit.data.sampler import MicroBatch
from megavit.parallel.grad_sync import average_gradients, sum_partial_gradients
from megavit.parallel.state import ParallelState
from megavit.training.grad_norm import clip_grad_norm
from megavit.training.lr_schedule import LRSchedule


@dataclass
class StepResult:
    loss: torch.Tensor       # 0-d: mean loss over the global batch
    grad_norm: torch.Tensor  # 0-d: global gradient norm before clipping
    lr: float


def classification_loss(label_smoothing: float = 0.0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Mean cross-entropy of logits [b, classes] against labels [b]."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    return loss


def forward_backward(model: nn.Module, micro_batches: list[MicroBatch],
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     device: torch.device) -> torch.Tensor:
    """Accumulate into .grad the gradient of this rank's mean loss over its micro-batches
    (all of equal size). Returns that mean loss, detached."""
    total = torch.zeros((), device=device)
    for images, labels, sample_ids in micro_batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        loss = loss_fn(model(images, sample_ids), labels) / len(micro_batches)
        loss.backward()
        total += loss.detach()
    return total


def optimizer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    pstate: ParallelState,
    clip_grad: float,
    on_gradients: Callable[[nn.Module], None] | None = None,
) -> torch.Tensor:
    """Synchronise the gradients in .grad (TP partial sums, DP mean), clip them by the
    global norm and step the optimizer at `lr`. Returns the norm before clipping.
    `on_gradients`, if given, sees the model after synchronisation and before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    sum_partial_gradients(params, pstate.tp)
    average_gradients(params, pstate.dp)
    if on_gradients is not None:
        on_gradients(model)
    grad_norm = clip_grad_norm(params, clip_grad, pstate.tp)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    iteration: int,
    micro_batches: list[MicroBatch],
    pstate: ParallelState,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    clip_grad: float,
    on_gradients: Callable[[nn.Module], None] | None = None,
) -> StepResult:
    """One optimizer step of iteration `iteration` (0-based)."""
    lr = schedule.lr_at(iteration)
    optimizer.zero_grad(set_to_none=True)
    loss = forward_backward(model, micro_batches, loss_fn, pstate.device)
    grad_norm = optimizer_step(model, optimizer, lr, pstate, clip_grad, on_gradients)
    loss = pstate.dp.all_reduce(loss.reshape(1)).div_(pstate.dp.size)[0]
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr)
