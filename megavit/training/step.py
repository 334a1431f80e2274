"""One optimizer step: the micro-batches through the pipeline schedule, data-parallel
gradient reduction, the optimizer.

    start the step: zero the gradient buffer                    (DataParallelBuffers)
    run the schedule over this rank's M micro-batches           (1F1B / interleaved; one
        each micro-batch's loss / M, times the loss scale        stage: F0 B0 F1 B1 ... =
        gradients accumulate into the fp32 / 16-bit buffer        gradient accumulation)
        buckets reduce over DP as they fill (--overlap-grad-reduce) or after backward
    finish the reductions; NaN/inf before communication? stop, naming rank and tensor
    optimizer: unscale, inf anywhere -> skip; clip by the global norm; AdamW on masters

The gradient is that of the mean loss over the global batch, whatever the layout. The loss
is computed on the last pipeline stage and broadcast to the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megavit.data.sampler import MicroBatch
from megavit.errors import RunFailure
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.pipeline_executor import PipelineExecutor, StepStats
from megavit.parallel.schedules import build_schedule
from megavit.parallel.state import ParallelState
from megavit.training.optimizer import MixedPrecisionOptimizer

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    loss: torch.Tensor       # 0-d: mean loss over the global batch
    grad_norm: torch.Tensor  # 0-d: global gradient norm before clipping (nan if skipped)
    lr: float
    stats: StepStats | None  # saved activation bytes (when measured), idle time
    skipped: bool = False    # an inf/NaN gradient with loss scaling: no update
    loss_scale: float | None = None


class NonFiniteError(RunFailure, RuntimeError):
    """A NaN or inf in the loss or a gradient, found before any communication; the message
    names the iteration, the rank and the tensors."""


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

    dtype = executor.dtype

    def forward(chunk: int, mb: int, x: torch.Tensor | None, meter) -> torch.Tensor:
        batch = micro_batches[mb]
        inputs = batch.images.to(device, dtype, non_blocking=True) if x is None else x
        return stage.chunks[chunk](inputs, batch.sample_ids, block_meter=meter)

    def loss(mb: int, logits: torch.Tensor) -> torch.Tensor:
        return on_logits(mb, logits, micro_batches[mb].labels.to(device, non_blocking=True))

    exclude = [*stage.parameters(), *stage.buffers()] if measure else None
    return executor.run(actions, forward,
                        lambda mb: activation_shape(stage, len(micro_batches[mb].labels)),
                        loss, forward_only, exclude)


def check_finite(total_loss: torch.Tensor, buffers: DataParallelBuffers,
                 pstate: ParallelState, iteration: int, last_stage: bool) -> None:
    """Raise NonFiniteError on every rank if any rank saw a NaN/inf loss or gradient (one
    all-reduce over all ranks); the rank that saw it names the tensors."""
    bad = buffers.non_finite()
    if last_stage and not bool(torch.isfinite(total_loss)):
        bad.insert(0, "the loss")
    flag = torch.tensor([pstate.rank + 1.0 if bad else 0.0], device=pstate.device)
    highest = int(pstate.world.all_reduce(flag, op=torch.distributed.ReduceOp.MAX).item())
    if highest:
        where = (f"on rank {pstate.rank} in {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "")
                 if bad else f"on rank {highest - 1} (this is rank {pstate.rank})")
        raise NonFiniteError(f"iteration {iteration}: NaN or inf {where}, detected before it "
                             "was communicated; stopping (--no-check-for-nan-in-loss-and-grad "
                             "turns this check off)")


def train_step(
    stage: nn.Module,
    buffers: DataParallelBuffers,
    optimizer: MixedPrecisionOptimizer,
    scaler,
    lr: float,
    micro_batches: list[MicroBatch],
    pstate: ParallelState,
    executor: PipelineExecutor,
    loss_fn: LossFn,
    clip_grad: float,
    iteration: int = 0,
    check_nan: bool = False,
    on_gradients: Callable[[nn.Module], None] | None = None,
    measure: bool = False,
) -> StepResult:
    """One optimizer step over this rank's micro-batches (all of equal size). `scaler`: a
    loss scaler or None. `on_gradients`, if given, sees the model after the gradients are
    reduced and before the optimizer: `p.main_grad` holds the reduced gradient — with the
    distributed optimizer only inside this rank's shard of each bucket (elsewhere the local
    gradient / d)."""
    n = len(micro_batches)
    buffers.start_step(n)
    scale = scaler.scale if scaler is not None else None
    total = torch.zeros((), device=pstate.device)

    def share(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal total
        loss = loss_fn(logits, labels) / n
        total = total + loss.detach()
        return loss * scale if scale is not None else loss

    stats = run_micro_batches(stage, executor, micro_batches, pstate, share, measure=measure)
    last = any(executor.layout.is_last(executor.stage, c) for c in range(executor.layout.chunks))
    return finish_step(stage, buffers, optimizer, scaler, lr, total, pstate, clip_grad,
                       iteration, check_nan, last, on_gradients, stats)


def finish_step(model: nn.Module, buffers: DataParallelBuffers,
                optimizer: MixedPrecisionOptimizer, scaler, lr: float, total: torch.Tensor,
                pstate: ParallelState, clip_grad: float, iteration: int, check_nan: bool,
                last_stage: bool, on_gradients: Callable[[nn.Module], None] | None = None,
                stats: StepStats | None = None) -> StepResult:
    """After backward: wait for the gradient reductions, the NaN check, `on_gradients`, the
    optimizer and the scaler; the step's loss (`total` on the last stage) averaged over dp
    and broadcast from the last stage to the others."""
    scale = scaler.scale if scaler is not None else None
    buffers.finish()
    if check_nan:
        check_finite(total, buffers, pstate, iteration, last_stage)
    if on_gradients is not None:
        on_gradients(model)
    outcome = optimizer.step(lr, clip_grad, scale)
    if scaler is not None:
        scaler.update(outcome.skipped)
    loss = pstate.dp.all_reduce(total.reshape(1).float()).div_(pstate.dp.size)
    pstate.pp.broadcast(loss, src=pstate.pp.size - 1)   # the loss lives on the last stage
    return StepResult(loss=loss[0], grad_norm=outcome.grad_norm, lr=lr, stats=stats,
                      skipped=outcome.skipped, loss_scale=scale)
