"""One optimizer step: the micro-batches through the pipeline schedule, gradient
synchronisation, global-norm clipping, AdamW.

    run the schedule over this rank's M micro-batches     (1F1B / interleaved; with one
        each micro-batch's loss is divided by M              stage: F0 B0 F1 B1 ... =
                                                              gradient accumulation)
    sum partial gradients over TP (QK-norms; SP norms)    (one all-reduce on the tp group)
    average gradients over DP                             (one all-reduce on the dp group)
    clip to --clip-grad by the global norm                (all-reduces on tp, then pp)
    AdamW step on this rank's shards

The gradient is that of the mean loss over the global batch, whatever the layout. The
loss is computed on the last pipeline stage and broadcast to the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megavit.data.sampler import MicroBatch
from megavit.parallel.grad_sync import average_gradients, sum_partial_gradients
from megavit.parallel.pipeline_executor import PipelineExecutor, StepStats
from megavit.parallel.schedules import build_schedule
from megavit.parallel.state import ParallelState
from megavit.training.grad_norm import clip_grad_norm

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    loss: torch.Tensor       # 0-d: mean loss over the global batch
    grad_norm: torch.Tensor  # 0-d: global gradient norm before clipping
    lr: float
    stats: StepStats         # saved activation bytes, when measured


def classification_loss(label_smoothing: float = 0.0) -> LossFn:
    """Mean cross-entropy of logits [b, classes] against labels [b]."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)

    return loss


def activation_shape(stage: nn.Module, batch: int) -> tuple[int, int, int]:
    """[tokens, images, width] of the hidden states passed between stages: this rank's
    sequence shard (padded) under sequence parallelism."""
    chunk = stage.chunks[0]
    rt = chunk.rt
    tokens = chunk.padded_length // rt.tp.size if rt.sequence_parallel else chunk.cfg.seq_length
    return tokens, batch, chunk.cfg.hidden_size


def run_micro_batches(stage: nn.Module, executor: PipelineExecutor,
                      micro_batches: list[MicroBatch], pstate: ParallelState,
                      on_logits: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                      forward_only: bool = False, measure: bool = False) -> StepStats:
    """Run this stage's schedule over `micro_batches`. On the model's last chunk,
    `on_logits(mb, logits, labels)` returns what to back-propagate (the micro-batch's
    share of the loss). `measure`: record the blocks' saved activation bytes."""
    device = pstate.device
    actions = build_schedule(len(micro_batches), executor.layout.stages, executor.stage,
                             executor.layout.chunks, forward_only)

    def forward(chunk: int, mb: int, x: torch.Tensor | None, meter) -> torch.Tensor:
        batch = micro_batches[mb]
        inputs = batch.images.to(device, non_blocking=True) if x is None else x
        return stage.chunks[chunk](inputs, batch.sample_ids, block_meter=meter)

    def loss(mb: int, logits: torch.Tensor) -> torch.Tensor:
        return on_logits(mb, logits, micro_batches[mb].labels.to(device, non_blocking=True))

    exclude = [*stage.parameters(), *stage.buffers()] if measure else None
    return executor.run(actions, forward,
                        lambda mb: activation_shape(stage, len(micro_batches[mb].labels)),
                        loss, forward_only, exclude)


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
    grad_norm = clip_grad_norm(params, clip_grad, pstate.tp, pstate.pp)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return grad_norm


def train_step(
    stage: nn.Module,
    optimizer: torch.optim.Optimizer,
    lr: float,
    micro_batches: list[MicroBatch],
    pstate: ParallelState,
    executor: PipelineExecutor,
    loss_fn: LossFn,
    clip_grad: float,
    on_gradients: Callable[[nn.Module], None] | None = None,
    measure: bool = False,
) -> StepResult:
    """One optimizer step over this rank's micro-batches (all of equal size)."""
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=pstate.device)
    n = len(micro_batches)

    def share(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal total
        loss = loss_fn(logits, labels) / n
        total = total + loss.detach()
        return loss

    stats = run_micro_batches(stage, executor, micro_batches, pstate, share, measure=measure)
    grad_norm = optimizer_step(stage, optimizer, lr, pstate, clip_grad, on_gradients)
    loss = pstate.dp.all_reduce(total.reshape(1)).div_(pstate.dp.size)
    pstate.pp.broadcast(loss, src=pstate.pp.size - 1)   # the loss lives on the last stage
    loss = loss[0]
    return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, stats=stats)
