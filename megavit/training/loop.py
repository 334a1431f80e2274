"""THE training loop, for every task: resume, step, log / evaluate / save every N, summary.

    summary = pretrain(task, pstate)     # build the run, train, evaluate; on every rank

Per iteration: `run.step`; every --log-interval a training line (loss, lr, grad norm,
throughput, step time, MFU when the task knows its FLOPs, loss scale, ETA and the task's
own fields); every --eval-interval the task's evaluation; every --save-interval a
checkpoint. Evaluation and saving are kept out of the throughput. At the end: a last
evaluation and the summary line.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterator

import torch

from megavit.checkpointing.checkpointer import (CheckpointDirectoryError, checkpoint_to_load,
                                                resume, resume_training_state,
                                                save_checkpoint)
from megavit.checkpointing.directory import CheckpointDirectory
from megavit.errors import StoppedBySignal
from megavit.parallel.schedules import build_schedule, format_schedule, theoretical_bubble
from megavit.parallel.state import ParallelState
from megavit.training.grad_scaler import ConstantGradScaler
from megavit.training.metrics import GpuMonitor, MetricsLogger, Stopwatch, format_eta
from megavit.training.optimizer import formula_bytes_per_parameter
from megavit.training.peak_flops import device_peak_flops
from megavit.training.recompute_plan import GIB
from megavit.training.run import Run, Task, param_dtype
from megavit.training.step import StepResult
from megavit.training.stopping import StopRequests


def pretrain(task: Task, pstate: ParallelState, stop: StopRequests | None = None
             ) -> dict[str, Any]:
    """Train `task` for --train-iters steps and evaluate; returns the summary metrics.
    `stop`: the run's StopRequests, installed by the entry point before anything is built
    (default: made here, from the checkpoint flags)."""
    cfg = task.config
    own = stop is None
    stop = StopRequests(cfg.checkpoint, pstate) if own else stop
    log = MetricsLogger(cfg.logging, pstate.is_main, cfg.training.train_iters)
    try:
        return train(Run.build(task, pstate), log, stop)
    finally:
        log.close()
        if own:
            stop.close()


def parameter_count(run: Run, params) -> float:
    """The whole model's count of `params` (this stage's, TP shards at full size, summed
    over the pipeline stages)."""
    pstate = run.pstate
    n = sum(p.numel() * (pstate.tp.size if getattr(p, "tp_shard", None) else 1) for p in params)
    return pstate.pp.all_reduce(torch.tensor([float(n)], dtype=torch.float64,
                                             device=pstate.device)).item()


def memory_per_parameter_line(run: Run) -> str:
    """The measured bytes per trained parameter on this rank, against the formula for this
    setting and for the other optimizer form (sharded vs unsharded)."""
    if not run.optimizer.masters:
        return ("memory per trained parameter on this rank: nothing is trained on this rank "
                "(frozen or locked)")
    mem = run.optimizer.bytes_per_parameter()
    d = run.pstate.dp.size
    if run.buffers.strategy == "full":
        # fp32 parameter, gradient and two moments, all sharded; ZeRO-1 for comparison
        sixteen = run.cfg.precision.bf16 or run.cfg.precision.fp16
        zero1 = formula_bytes_per_parameter(2 if sixteen else 4, 4, sixteen, d)
        return ("memory per trained parameter on this rank: " + " + ".join(
            f"{k} {v:.2f}" for k, v in mem.items()) + f" = {sum(mem.values()):.2f} bytes | "
            f"formula {16 / d:.2f} (parameters, gradients and optimizer sharded over {d}, "
            f"FSDP2) | ZeRO-1: {zero1:.2f}")
    p_bytes = next(run.model.parameters()).element_size()
    g_bytes = run.buffers.grad_buffer.element_size()
    master = run.optimizer.separate_masters
    shards = d if run.buffers.shard else 1
    here = formula_bytes_per_parameter(p_bytes, g_bytes, master, shards)
    other = formula_bytes_per_parameter(p_bytes, g_bytes, master, 1 if run.buffers.shard else d)
    line = ("memory per trained parameter on this rank: " + " + ".join(
        f"{k} {v:.2f}" for k, v in mem.items()) + f" = {sum(mem.values()):.2f} bytes | formula "
        f"{here:.2f} ({'sharded over ' + str(d) if run.buffers.shard else 'unsharded'})")
    if d > 1:
        line += f" | {'unsharded' if run.buffers.shard else 'sharded over ' + str(d)}: {other:.2f}"
    return line


def layout_lines(run: Run) -> list[str]:
    """The start-up lines of the layout: groups, SP, recomputation, the pipeline split and
    bubble, the printed schedule and the recompute plans when asked for."""
    cfg, pstate, rt = run.cfg, run.pstate, run.model.rt
    recompute = rt.recompute_granularity or "none"
    if run.plans is not None:
        recompute = "auto (per stage, see the plan below)"
    elif rt.recompute_granularity == "full":
        recompute += f" ({rt.recompute_method}, {rt.recompute_num_layers} layers)"
    sp = rt.sequence_parallel or "off"
    if cfg.parallel.sequence_parallel and pstate.tp.size == 1:
        sp = "off (--sequence-parallel has no effect at TP=1)"
    lines = [f"layout: {pstate.describe()} | sequence parallel {sp} | recompute {recompute}"]
    layout, m = run.layout, run.micro_batches
    split_backward = run.executor.weight_grads is not None     # zero bubble: B and W apart
    if layout.stages > 1:
        split = ", ".join(f"{k}: {'+'.join(str(len(layout.chunk_layers(k, c))) for c in range(layout.chunks))}"
                          for k in range(layout.stages))
        schedule = ("interleaved" if layout.chunks > 1 else
                    "zero bubble H1" if split_backward else "1F1B")
        P = layout.stages
        bubble = (f"bubble (P-1)/(P-1+3m) with F = B = W = {(P - 1) / (P - 1 + 3 * m):.3f} "
                  f"(1F1B's {theoretical_bubble(m, P):.3f})"
                  if split_backward else
                  f"bubble (P-1)/(v*m+P-1) = {theoretical_bubble(m, P, layout.chunks):.3f}")
        lines.append(f"pipeline: {P} stages, {schedule}, blocks per stage {{{split}}}, "
                     f"{m} micro-batches per step, {bubble}")
    if cfg.logging.print_schedule:
        lines.append("schedule:\n" + format_schedule(
            [build_schedule(m, layout.stages, k, layout.chunks, zero_bubble=split_backward)
             for k in range(layout.stages)],
            layout.chunks))
    if run.plans is not None:
        budget = cfg.parallel.activation_memory_budget_gb * GIB
        lines += [f"recompute plan: {plan.describe(budget)}" for plan in run.plans]
    return lines


def precision_line(run: Run) -> str:
    cfg, scaler = run.cfg, run.scaler
    pr, p, dp = cfg.precision, cfg.parallel, run.pstate.dp
    precision = "bf16" if pr.bf16 else "fp16" if pr.fp16 else "fp32"
    scaling = ("none" if scaler is None else f"static {scaler.scale:g}"
               if isinstance(scaler, ConstantGradScaler) else f"dynamic from {scaler.scale:g}")
    if run.buffers.strategy == "full":
        return (f"precision: {precision} compute, fp32 parameters sharded (the masters) | "
                f"gradients reduced in fp32 | loss scaling {scaling} | optimizer "
                f"{run.optimizer.implementation} | fully sharded over {dp.size} DP ranks "
                f"(FSDP2), {len(run.buffers.units)} units, gradients reduce-scattered "
                f"during backward")
    return (f"precision: {precision} parameters and activations | gradients in "
            f"{str(run.buffers.grad_buffer.dtype).replace('torch.', '')} | loss scaling "
            f"{scaling} | optimizer {run.optimizer.implementation}, "
            f"{'sharded over ' + str(dp.size) + ' DP ranks' if p.use_distributed_optimizer else 'not sharded'}"
            f" | gradient buckets {len(run.buffers.buckets)}"
            f"{', reduced during backward' if p.overlap_grad_reduce else ''}")


class TrainingLine:
    """The fields of the training lines: the mean loss since the last line, throughput,
    step time, MFU (when the task knows its FLOPs), GPU readings, the loss scale and
    skipped steps, the ETA and the task's own fields."""

    def __init__(self, run: Run, log: MetricsLogger) -> None:
        cfg, pstate = run.cfg, run.pstate
        self.run, self.training = run, cfg.training
        self.flops_per_step = run.task.flops_per_step(run)
        self.peak, source = float("inf"), "none"
        # Only the logging rank needs the MFU denominator (measuring it on CPU takes a moment).
        if self.flops_per_step is not None and pstate.is_main:
            self.peak, source = device_peak_flops(pstate.device, param_dtype(cfg.precision),
                                                  cfg.precision.tf32, cfg.logging.peak_tflops)
        # a measured peak (CPU) varies with the machine's load: never report MFU above 100 %
        self.peak_is_measured = source.startswith("measured")
        if self.flops_per_step is not None:
            note = ("; an estimate: raised to the best rate a step reaches if one exceeds it"
                    if self.peak_is_measured else "")
            log.info(f"mfu peak: {self.peak / 1e12:.3f} TFLOP/s per device ({source}{note})")
            warning = slow_run_warning(self.flops_per_step / pstate.world_size / self.peak,
                                       cfg.training.train_iters)
            if pstate.device.type == "cpu" and warning:
                log.info(warning)
        self.gpu = GpuMonitor(pstate.device)
        self.watch = Stopwatch(pstate.device)
        self.loss_sum, self.steps = torch.zeros((), device=pstate.device), 0
        self.skipped = 0
        self.data_wait = 0.0    # seconds the steps since the last line waited for batches

    def add(self, result: StepResult) -> None:
        self.loss_sum += result.loss
        self.skipped += int(result.skipped)
        self.steps += 1

    def fields(self, done: int, result: StepResult) -> dict[str, Any]:
        """The line after iteration `done` (the last step's `result`); starts a new span."""
        step_time = self.watch.lap() / self.steps
        task = self.run.task
        line = {"iteration": done, "loss": (self.loss_sum / self.steps).item(),
                "lr": result.lr, "grad_norm": result.grad_norm.item(),
                f"{task.throughput_unit}_per_second":
                    self.training.global_batch_size / step_time,
                "step_time_ms": step_time * 1e3,
                "data_wait_ms": self.data_wait / self.steps * 1e3}
        if self.flops_per_step is not None:
            achieved = self.flops_per_step / step_time / self.run.pstate.world_size
            if self.peak_is_measured and achieved > self.peak:
                self.peak = achieved
            line.update(tflops_per_device=achieved / 1e12, mfu=achieved / self.peak)
        line.update(self.gpu.read())
        if result.loss_scale is not None:
            line.update(loss_scale=result.loss_scale, skipped_steps=self.skipped)
        line["eta"] = format_eta(step_time * (self.training.train_iters - done))
        line.update(task.train_fields(self.run))
        self.loss_sum.zero_()
        self.steps = 0
        self.data_wait = 0.0
        return line


class WaitTimed:
    """An iterator of batches that adds the seconds each `next` took (the step waiting
    for its data: loader workers behind, or reading in this process) to `line.data_wait`."""

    def __init__(self, batches: Iterator, line: TrainingLine) -> None:
        self.batches, self.line = batches, line

    def __iter__(self) -> "WaitTimed":
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.line.data_wait += time.perf_counter() - start

    def close(self) -> None:
        getattr(self.batches, "close", lambda: None)()


def slow_run_warning(step_seconds: float, iterations: int) -> str | None:
    """On a CPU, a warning when a step takes over a second even at the measured peak (the
    defaults, ViT-B at 224 px, take minutes per step): what it will cost, and what to run
    instead."""
    if step_seconds < 1.0:
        return None
    return (f"warning: on this CPU a step takes at least {step_seconds:.1f} s (FLOPs per step "
            f"/ the measured peak), so --train-iters {iterations} takes at least "
            f"{format_eta(step_seconds * iterations)}; for a first run on a CPU try `make "
            "quickstart` (a small ViT on 8x8 digits, a few minutes) or --preset vit-debug")


def every(interval: int | None, done: int) -> bool:
    """Whether iteration `done` is a multiple of a (set) --*-interval."""
    return bool(interval) and done % interval == 0


def finished_run(run: Run, log: MetricsLogger, iteration: int) -> dict[str, Any]:
    """A resumed run with nothing left to train: say so, evaluate, and summarise."""
    log.info(f"nothing to train: the checkpoint is at iteration {iteration} and --train-iters "
             f"is {run.cfg.training.train_iters}; evaluating it (raise --train-iters to train "
             "on)")
    evaluation = run.evaluate()
    if evaluation:
        log.eval({"iteration": iteration, **evaluation})
    summary = {"iteration": iteration, "trained_iterations": 0,
               **run.task.summary_fields(evaluation)}
    log.summary(summary)
    return summary


def evaluate_only(run: Run, log: MetricsLogger) -> dict[str, Any]:
    """--eval-only: load --load's checkpoint (any saved layout, resharded), evaluate it on
    the held-out split, log the eval line and the summary; nothing is written to disk."""
    load = run.cfg.checkpoint.load
    latest = checkpoint_to_load("--load", load, log.info)
    if latest is None:
        raise CheckpointDirectoryError(f"--eval-only: --load {load} holds no checkpoint to "
                                       "evaluate (missing or empty directory)")
    iteration = resume_training_state(run, latest, log.info)
    evaluation = run.evaluate()
    if evaluation:
        log.eval({"iteration": iteration, **evaluation})
    else:
        log.info("--eval-only: this run has no held-out split to evaluate on")
    summary = {"iteration": iteration, "trained_iterations": 0,
               **run.task.summary_fields(evaluation)}
    log.summary(summary)
    return summary


def train(run: Run, log: MetricsLogger, stop: StopRequests) -> dict[str, Any]:
    """The loop over iterations [resumed, --train-iters); returns the summary metrics
    (raises StoppedBySignal after saving when SIGTERM / SIGINT stopped it). `stop` is
    checked once after resuming (a signal during start-up: every rank leaves before the
    first step) and after every step."""
    training, logging, checkpoint = run.cfg.training, run.cfg.logging, run.cfg.checkpoint
    iters, task = training.train_iters, run.task
    for line in [*layout_lines(run), *task.log_lines(run), precision_line(run)]:
        log.info(line)
    lines = TrainingLine(run, log)
    last: dict[str, Any] = {}
    paused = 0.0        # seconds spent evaluating and saving, kept out of the throughput
    memory_logged = False
    if checkpoint.eval_only:
        return evaluate_only(run, log)
    if checkpoint.save and run.pstate.is_main:   # what a killed save left behind
        CheckpointDirectory(checkpoint.save).remove_staging()
    first = resume(run, checkpoint.load, log.info, checkpoint.finetune,
                   checkpoint.pretrained_checkpoint, checkpoint.reset_classifier,
                   checkpoint.save)
    if (reason := stop.check(budget=False)) is not None:    # a signal during start-up
        message = f"stopped | {reason} before the first step | nothing new to save"
        log.info(message)
        raise StoppedBySignal(message, stop.stopped_by)
    if first >= iters:
        return finished_run(run, log, first)
    run.model.train()
    batches = WaitTimed(iter(run.batches(first, iters)), lines)
    try:
        for iteration, batch in zip(range(first, iters), batches):
            result = run.step(iteration, batch)
            if not memory_logged and not result.skipped:  # Adam's state exists after a step
                log.info(memory_per_parameter_line(run))
                memory_logged = True
            lines.add(result)
            done = iteration + 1
            log.progress(done)
            if every(logging.log_interval, done) or done == iters:
                last = lines.fields(done, result)
                log.train(last)
            if every(logging.eval_interval, done) and done != iters:
                start = time.perf_counter()
                if evaluation := run.evaluate():
                    log.eval({"iteration": done, **evaluation})
                paused += time.perf_counter() - start
                lines.watch.lap()
            saved = None
            if checkpoint.save and (every(checkpoint.save_interval, done) or done == iters):
                start = time.perf_counter()
                saved = save_checkpoint(run, checkpoint.save, done,
                                        checkpoint.keep_last_checkpoints, log.info)
                paused += time.perf_counter() - start
                lines.watch.lap()
            if done < iters and (reason := stop.check()) is not None:
                return stop_early(run, log, stop, reason, done, saved,
                                  {"iteration": done, "train_seconds":
                                   lines.watch.total() - paused,
                                   "loss": last.get("loss", float("nan"))})
    finally:
        getattr(batches, "close", lambda: None)()    # loader workers end with the loop
    train_time = lines.watch.total() - paused
    evaluation = run.evaluate()
    if evaluation:
        log.eval({"iteration": iters, **evaluation})
    summary = {"iteration": iters, "train_seconds": train_time,
               "loss": last.get("loss", float("nan")), **task.summary_fields(evaluation),
               f"{task.throughput_unit}_per_second":
                   training.global_batch_size * (iters - first) / train_time
                   if train_time > 0 else 0.0}
    log.summary(summary)
    return summary


def stop_early(run: Run, log: MetricsLogger, stop: StopRequests, reason: str, done: int,
               saved: Path | None, summary: dict[str, Any]) -> dict[str, Any]:
    """Every rank agreed to stop after iteration `done`: save (unless this iteration was
    just saved), say where, and end — by StoppedBySignal for a signal, by returning the
    summary (no evaluation) for the wall-clock budget."""
    checkpoint = run.cfg.checkpoint
    if checkpoint.save and saved is None:
        saved = save_checkpoint(run, checkpoint.save, done, checkpoint.keep_last_checkpoints,
                                log.info)
    where = (f"checkpoint {saved} (resume with --load {checkpoint.save})" if saved else
             "no checkpoint (no --save)")
    message = f"stopped | {reason} after iteration {done} | {where}"
    log.info(message)
    if stop.stopped_by:
        raise StoppedBySignal(message, stop.stopped_by)
    log.summary({**summary, "stopped_early": 1})
    return summary
