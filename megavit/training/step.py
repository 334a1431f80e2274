"""One optimizer step: the task's forward and backward (for a `StageModel`, the
micro-batches through the pipeline schedule), data-parallel gradient reduction, the
optimizer.

    start the step: zero the gradient buffer                    (DataParallelBuffers)
    the task's forward_backward, e.g. `pipeline_forward_backward`:
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
from typing import Any, Callable, Protocol

import torch
from torch import nn

from megavit.config import Config
from megavit.data.sampler import MicroBatch
from megavit.errors import RunFailure
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.full_sharding import FullyShardedGradients
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


def activation_shape(stage: nn.Module, batch: int, chunk: int = 0) -> tuple[int, int, int]:
    """[tokens, images, width] of the hidden states local chunk `chunk` receives from the
    previous stage: its input's tokens (fewer after a --patch-merge-layers merge), this
    rank's sequence shard (padded) under sequence parallelism, and after them the
    --feature-layers outputs the stages before it hold (`VisionTransformer.received_tokens`)."""
    part = stage.chunks[chunk]
    return part.received_tokens, batch, part.cfg.hidden_size


def run_micro_batches(stage: nn.Module, executor: PipelineExecutor,
                      micro_batches: list[MicroBatch], pstate: ParallelState,
                      on_logits: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
                      forward_only: bool = False, measure: bool = False,
                      apply_head: bool = True) -> StepStats:
    """Run this stage's schedule over `micro_batches`. On the model's last chunk,
    `on_logits(mb, logits, labels)` returns what to back-propagate (the micro-batch's
    share of the loss). `measure`: record the blocks' saved activation bytes.
    `apply_head` False: the last chunk hands `on_logits` the pooled features instead."""
    device = pstate.device
    actions = build_schedule(len(micro_batches), executor.layout.stages, executor.stage,
                             executor.layout.chunks, forward_only,
                             zero_bubble=executor.weight_grads is not None)

    dtype = executor.dtype

    def forward(chunk: int, mb: int, x: torch.Tensor | None, meter) -> torch.Tensor:
        batch = micro_batches[mb]
        inputs = batch.images.to(device, dtype, non_blocking=True) if x is None else x
        return stage.chunks[chunk](inputs, batch.sample_ids, block_meter=meter,
                                   apply_head=apply_head)

    def loss(mb: int, logits: torch.Tensor) -> torch.Tensor:
        return on_logits(mb, logits, micro_batches[mb].labels.to(device, non_blocking=True))

    exclude = [*stage.parameters(), *stage.buffers()] if measure else None
    return executor.run(actions, forward,
                        lambda mb, chunk: activation_shape(stage, len(micro_batches[mb].labels),
                                                           chunk),
                        loss, forward_only, exclude)


def check_finite(total_loss: torch.Tensor,
                 buffers: "DataParallelBuffers | FullyShardedGradients",
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
        when = ("detected before it was communicated" if buffers.strategy == "optimizer"
                else "in the reduced gradient shards (full sharding: the rank named holds "
                     "it, another may have produced it)")
        raise NonFiniteError(f"iteration {iteration}: NaN or inf {where}, {when}; stopping "
                             "(--no-check-for-nan-in-loss-and-grad turns this check off)")


class Engine(Protocol):
    """What a step needs of the run (`training.run.Run` is one)."""

    cfg: Config
    task: Any                      # forward_backward(run, batch, scale, measure), micro_batch_count
    pstate: ParallelState
    model: nn.Module
    buffers: DataParallelBuffers
    optimizer: MixedPrecisionOptimizer
    scaler: Any                    # a loss scaler or None
    lr_schedule: Any               # lr_at(iteration)
    executor: PipelineExecutor

    @property
    def is_last_stage(self) -> bool: ...


def train_step(run: Engine, iteration: int, batch: Any,
               on_gradients: Callable[[nn.Module], None] | None = None,
               measure: bool = False) -> StepResult:
    """One optimizer step over this rank's `batch`: the task's forward and backward (its
    loss times the loss scale), then `finish_step`. `on_gradients`, if given, sees the
    model after the gradients are reduced and before the optimizer: `p.main_grad` holds
    the reduced gradient — with the distributed optimizer only inside this rank's shard of
    each bucket (elsewhere the local gradient / d); fully sharded there is no `main_grad`:
    each parameter's `.grad` holds this rank's shard of the reduced gradient."""
    lr = run.lr_schedule.lr_at(iteration)
    run.buffers.start_step(run.task.micro_batch_count(batch))
    scale = run.scaler.scale if run.scaler is not None else None
    total, stats = run.task.forward_backward(run, batch, scale, measure)
    return finish_step(run, lr, total, iteration, on_gradients, stats)


def pipeline_forward_backward(run: Engine, micro_batches: list[MicroBatch], loss_fn: LossFn,
                              scale: float | None, measure: bool = False
                              ) -> tuple[torch.Tensor, StepStats]:
    """The forward and backward of a `StageModel` over `micro_batches` (all of equal
    size) through the pipeline schedule, each micro-batch's `loss_fn(output, labels) / M`
    (times the loss scale) back-propagated; returns their sum (on the last stage) and the
    step's stats."""
    n = len(micro_batches)
    total = torch.zeros((), device=run.pstate.device)

    def share(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal total
        loss = loss_fn(logits, labels) / n
        total = total + loss.detach()
        return loss * scale if scale is not None else loss

    stats = run_micro_batches(run.model, run.executor, micro_batches, run.pstate, share,
                              measure=measure)
    return total, stats


def finish_step(run: Engine, lr: float, total: torch.Tensor, iteration: int,
                on_gradients: Callable[[nn.Module], None] | None = None,
                stats: StepStats | None = None) -> StepResult:
    """After backward: wait for the gradient reductions, the NaN check, `on_gradients`, the
    optimizer and the scaler; the step's loss (`total` on the last stage) averaged over dp
    and broadcast from the last stage to the others."""
    pstate, scaler = run.pstate, run.scaler
    scale = scaler.scale if scaler is not None else None
    run.buffers.finish()
    if nan_check(run.cfg.precision):
        # named as the logs count: the step of (0-based) `iteration` ends iteration + 1
        check_finite(total, run.buffers, pstate, iteration + 1, run.is_last_stage)
    if on_gradients is not None:
        on_gradients(run.model)
    outcome = run.optimizer.step(lr, run.cfg.training.clip_grad, scale)
    if scaler is not None:
        scaler.update(outcome.skipped)
    loss = pstate.dp.all_reduce(total.reshape(1).float()).div_(pstate.dp.size)
    pstate.pp.broadcast(loss, src=pstate.pp.size - 1)   # the loss lives on the last stage
    return StepResult(loss=loss[0], grad_norm=outcome.grad_norm, lr=lr, stats=stats,
                      skipped=outcome.skipped, loss_scale=scale)


def nan_check(precision) -> bool:
    """--check-for-nan-in-loss-and-grad, defaulting to on unless a loss scaler (fp16 or
    --loss-scale) handles overflows by skipping steps."""
    if precision.check_for_nan_in_loss_and_grad is not None:
        return precision.check_for_nan_in_loss_and_grad
    return not precision.fp16 and precision.loss_scale is None
