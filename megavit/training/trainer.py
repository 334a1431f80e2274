"""The pretraining loop: build data, model and optimizer, train, evaluate, log.

    summary = pretrain(cfg, pstate)     # returns the final metrics (on every rank)
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from megavit.config import Config, ConfigError
from megavit.data.datasets import Dataset, build_datasets
from megavit.data.sampler import GlobalBatchSampler, MicroBatch, eval_batches, train_batches
from megavit.models.activation_memory import ActivationSetup
from megavit.models.vit import Runtime, StageModel, build_stage
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.pipeline_executor import PipelineExecutor
from megavit.parallel.pipeline_layout import PipelineLayout, PipelineLayoutError
from megavit.parallel.random import RNGTracker
from megavit.parallel.schedules import (ScheduleError, build_schedule, format_schedule,
                                        theoretical_bubble)
from megavit.parallel.state import ParallelState
from megavit.training.lr_schedule import LRSchedule
from megavit.training.metrics import GpuMonitor, MetricsLogger, Stopwatch, format_eta
from megavit.training.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megavit.checkpointing.checkpointer import resume, save_checkpoint
from megavit.training.optimizer import MixedPrecisionOptimizer, formula_bytes_per_parameter
from megavit.training.peak_flops import configure_tf32, device_peak_flops
from megavit.training.recompute_plan import GIB, StagePlan, plan_all_stages
from megavit.training.step import StepResult, classification_loss, run_micro_batches, train_step


@torch.no_grad()
def evaluate(run: "TrainingRun") -> dict[str, float]:
    """Mean loss and top-1 accuracy over the held-out split (or its first --eval-iters
    global batches): the same images in every layout, run forward through the pipeline,
    summed over DP ranks and shared from the last stage with the others."""
    pstate, model, t = run.pstate, run.model, run.cfg.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=pstate.device)  # loss, correct, count

    def tally(mb: int, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(dim=-1) == labels).sum()
        sums[2] += labels.numel()
        return logits.new_zeros(())

    for micro_batches in eval_batches(run.heldout, t.global_batch_size, pstate.dp.rank,
                                      pstate.dp.size, t.micro_batch_size,
                                      run.cfg.logging.eval_iters, run.needs_images):
        micro_batches = [mb for mb in micro_batches if mb.labels.numel()]
        if micro_batches:
            run_micro_batches(model, run.executor, micro_batches, pstate, tally,
                              forward_only=True)
    pstate.dp.all_reduce(sums)
    pstate.pp.broadcast(sums, src=pstate.pp.size - 1)   # every stage reports the result
    model.train()
    count = max(sums[2].item(), 1.0)
    return {"eval_loss": sums[0].item() / count, "eval_accuracy": sums[1].item() / count,
            "eval_images": int(sums[2].item())}


def param_dtype(precision) -> torch.dtype:
    """The parameters' and activations' dtype: --bf16, --fp16 or fp32."""
    return torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32


def nan_check(precision) -> bool:
    """--check-for-nan-in-loss-and-grad, defaulting to on unless a loss scaler (fp16 or
    --loss-scale) handles overflows by skipping steps."""
    if precision.check_for_nan_in_loss_and_grad is not None:
        return precision.check_for_nan_in_loss_and_grad
    return not precision.fp16 and precision.loss_scale is None


def loss_scaler(precision) -> ConstantGradScaler | DynamicGradScaler | None:
    """--loss-scale: static; fp16 without it: dynamic; otherwise none."""
    if precision.loss_scale is not None:
        return ConstantGradScaler(precision.loss_scale)
    if precision.fp16:
        return DynamicGradScaler(precision.initial_loss_scale, precision.min_loss_scale,
                                 window=precision.loss_scale_window,
                                 hysteresis=precision.hysteresis)
    return None


def gradient_buffers(named_params: list, cfg: Config, pstate: ParallelState
                     ) -> DataParallelBuffers:
    """The data-parallel gradient buffer of `named_params` as the parallel and precision
    flags say (bucket size, sharding, overlap, gradient dtype, NaN check)."""
    pr, p = cfg.precision, cfg.parallel
    grad_dtype = torch.float16 if pr.fp16 and not pr.accumulate_allreduce_grads_in_fp32 \
        else torch.float32                  # bf16 gradients always in fp32 (Megatron)
    return DataParallelBuffers(
        named_params, pstate.dp, pstate.tp, grad_dtype,
        p.ddp_bucket_size or max(40_000_000, 1_000_000 * pstate.dp.size),
        shard=p.use_distributed_optimizer, overlap=p.overlap_grad_reduce,
        check_finite=nan_check(pr))


def lr_schedule(t) -> LRSchedule:
    """--lr, --min-lr, warm-up and decay (over --lr-decay-iters, default --train-iters)."""
    return LRSchedule(t.lr, t.min_lr, t.lr_warmup_iters, t.lr_decay_iters or t.train_iters,
                      t.lr_decay_style)


def pipeline_layout(cfg: Config) -> PipelineLayout:
    """The split of the blocks over the pipeline stages; ConfigError when impossible."""
    p = cfg.parallel
    try:
        return PipelineLayout.from_flags(cfg.model.num_layers, p.pipeline_model_parallel_size,
                                         p.num_layers_per_virtual_pipeline_stage,
                                         p.num_layers_in_first_pipeline_stage,
                                         p.num_layers_in_last_pipeline_stage)
    except PipelineLayoutError as e:
        raise ConfigError(str(e)) from None


def recompute_plans(cfg: Config, layout: PipelineLayout, micro_batches: int,
                    sequence_parallel: str | None) -> list[StagePlan] | None:
    """Every stage's plan under --recompute-granularity auto (None otherwise); ConfigError
    when the budget fits no plan."""
    p, t = cfg.parallel, cfg.training
    if p.recompute_granularity != "auto":
        return None
    setup = ActivationSetup(tp=p.tensor_model_parallel_size, micro_batch=t.micro_batch_size,
                            sequence_parallel=sequence_parallel)
    return plan_all_stages(cfg.model, layout, micro_batches, setup,
                           p.activation_memory_budget_gb * GIB)


def check_schedule(cfg: Config, layout: PipelineLayout, dp_size: int) -> int:
    """The number of micro-batches per step, checked against the schedule; ConfigError
    when the schedule cannot run it. Also checks block recomputation against the stages,
    and that a --recompute-granularity auto budget fits a plan."""
    t = cfg.training
    m = t.global_batch_size // (t.micro_batch_size * dp_size)
    try:
        build_schedule(m, layout.stages, 0, layout.chunks)
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    p = cfg.parallel
    if p.recompute_granularity == "full" and p.recompute_method == "block":
        per_chunk = min(len(layout.chunk_layers(k, 0)) for k in range(layout.stages))
        if p.recompute_num_layers > per_chunk:
            raise ConfigError(f"--recompute-num-layers {p.recompute_num_layers} (method block) "
                              f"is more than the {per_chunk} blocks of a pipeline stage's chunk")
    sp = None
    if p.sequence_parallel and p.tensor_model_parallel_size > 1:
        sp = "regather" if p.sequence_parallel_regather else "keep"
    recompute_plans(cfg, layout, m, sp)
    return m


def _resolve_num_classes(cfg: Config, train: Dataset) -> Config:
    m = cfg.model
    if m.num_classes is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(m, num_classes=train.num_classes))
    if m.num_classes == 0:
        raise ConfigError("--num-classes 0 builds a feature extractor; pretraining needs a "
                          "classifier (leave --num-classes unset to use the dataset's)")
    if m.num_classes < train.num_classes:
        raise ConfigError(f"--num-classes {m.num_classes} is smaller than the "
                          f"{train.num_classes} classes of {train.name}")
    return cfg


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


@dataclass
class TrainingRun:
    """Everything one training run holds on this rank, built the same way for `pretrain`
    and tests: this pipeline stage's part of the model, its optimizer and executor."""

    cfg: Config
    pstate: ParallelState
    model: StageModel
    buffers: DataParallelBuffers
    optimizer: MixedPrecisionOptimizer
    scaler: ConstantGradScaler | DynamicGradScaler | None
    schedule: LRSchedule
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_set: Dataset
    heldout: Dataset
    sampler: GlobalBatchSampler
    layout: PipelineLayout
    executor: PipelineExecutor
    plans: list[StagePlan] | None = None   # --recompute-granularity auto

    @classmethod
    def build(cls, cfg: Config, pstate: ParallelState) -> "TrainingRun":
        t, p, pr = cfg.training, cfg.parallel, cfg.precision
        configure_tf32(pr.tf32)
        train_set, heldout = build_datasets(cfg.data, cfg.model, t.seed)
        cfg = _resolve_num_classes(cfg, train_set)
        layout = pipeline_layout(cfg)
        micro_batches = check_schedule(cfg, layout, pstate.dp.size)
        stage = pstate.pp.rank
        # Each stage seeds its dropout streams apart: its layers are different layers.
        rng = RNGTracker(t.seed + 100 * stage, pstate.tp.rank, pstate.device)
        runtime = Runtime.from_config(p, pstate.tp, t.seed, rng, t.layernorm_impl)
        plans = recompute_plans(cfg, layout, micro_batches, runtime.sequence_parallel)
        if plans is not None:
            n = plans[stage].recomputed
            runtime = dataclasses.replace(runtime, recompute_granularity="full" if n else None,
                                          recompute_method="block", recompute_num_layers=n or 1)
        dtype = param_dtype(pr)
        model = build_stage(cfg.model, runtime, t.seed, layout, stage, pstate.device, dtype)
        buffers = gradient_buffers(list(model.named_parameters()), cfg, pstate)
        return cls(
            cfg=cfg, pstate=pstate, model=model, buffers=buffers,
            optimizer=MixedPrecisionOptimizer(buffers, t, pstate,
                                              master_weights=dtype != torch.float32),
            scaler=loss_scaler(pr), schedule=lr_schedule(t),
            loss_fn=classification_loss(t.label_smoothing), train_set=train_set,
            heldout=heldout, sampler=GlobalBatchSampler(len(train_set), t.global_batch_size, t.seed),
            layout=layout,
            executor=PipelineExecutor(layout, stage, pstate.pp_channels, pstate.device, dtype),
            plans=plans,
        )

    @property
    def needs_images(self) -> bool:
        """Only the stage holding the model's first chunk reads images."""
        return any(self.layout.is_first(self.pstate.pp.rank, c) for c in range(self.layout.chunks))

    def batches(self, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches for iterations [start, stop)."""
        t, d, dp = self.cfg.training, self.cfg.data, self.pstate.dp
        return train_batches(self.train_set, self.sampler, start, stop, dp.rank, dp.size,
                             t.micro_batch_size, d.num_workers, d.augment, self.needs_images)

    def step(self, iteration: int, micro_batches: list[MicroBatch],
             on_gradients: Callable[[nn.Module], None] | None = None,
             measure: bool = False) -> StepResult:
        return train_step(self.model, self.buffers, self.optimizer, self.scaler,
                          self.schedule.lr_at(iteration), micro_batches, self.pstate,
                          self.executor, self.loss_fn, self.cfg.training.clip_grad,
                          iteration, nan_check(self.cfg.precision), on_gradients, measure)

    def evaluate(self) -> dict[str, float]:
        return evaluate(self)


def pretrain(cfg: Config, pstate: ParallelState) -> dict[str, Any]:
    """Train for --train-iters steps and evaluate; returns the summary metrics."""
    log = MetricsLogger(cfg.logging, pstate.is_main, cfg.training.train_iters)
    try:
        return _train(TrainingRun.build(cfg, pstate), log)
    finally:
        log.close()


def memory_per_parameter_line(run: TrainingRun) -> str:
    """The measured bytes per trained parameter on this rank, against the formula for this
    setting and for the other optimizer form (sharded vs unsharded)."""
    mem = run.optimizer.bytes_per_parameter()
    p_bytes = next(run.model.parameters()).element_size()
    g_bytes = run.buffers.grad_buffer.element_size()
    master = run.optimizer.separate_masters
    d = run.pstate.dp.size
    shards = d if run.buffers.shard else 1
    here = formula_bytes_per_parameter(p_bytes, g_bytes, master, shards)
    other = formula_bytes_per_parameter(p_bytes, g_bytes, master, 1 if run.buffers.shard else d)
    line = ("memory per trained parameter on this rank: " + " + ".join(
        f"{k} {v:.2f}" for k, v in mem.items()) + f" = {sum(mem.values()):.2f} bytes | formula "
        f"{here:.2f} ({'sharded over ' + str(d) if run.buffers.shard else 'unsharded'})")
    if d > 1:
        line += f" | {'unsharded' if run.buffers.shard else 'sharded over ' + str(d)}: {other:.2f}"
    return line


def _train(run: TrainingRun, log: MetricsLogger) -> dict[str, Any]:
    cfg, pstate, model = run.cfg, run.pstate, run.model
    m, t, lg = cfg.model, cfg.training, cfg.logging
    dp = pstate.dp
    micro_per_step = t.global_batch_size // (t.micro_batch_size * dp.size)
    stage_params = sum(p.numel() * (pstate.tp.size if getattr(p, "tp_shard", None) else 1)
                       for p in model.parameters())
    total_params = pstate.pp.all_reduce(torch.tensor(
        [stage_params], dtype=torch.float64, device=pstate.device)).item()
    flops_per_step = model.estimate_flops(t.global_batch_size, training=True)
    # Only the logging rank needs the MFU denominator (measuring it on CPU takes a moment).
    peak, peak_source = (device_peak_flops(pstate.device, param_dtype(cfg.precision),
                                           cfg.precision.tf32, lg.peak_tflops)
                         if pstate.is_main else (float("inf"), ""))
    gpu = GpuMonitor(pstate.device)

    rt = model.rt
    recompute = rt.recompute_granularity or "none"
    if run.plans is not None:
        recompute = "auto (per stage, see the plan below)"
    elif rt.recompute_granularity == "full":
        recompute += f" ({rt.recompute_method}, {rt.recompute_num_layers} layers)"
    sp = rt.sequence_parallel or "off"
    if cfg.parallel.sequence_parallel and pstate.tp.size == 1:
        sp = "off (--sequence-parallel has no effect at TP=1)"
    log.info(f"layout: {pstate.describe()} | sequence parallel {sp} | recompute {recompute}")
    layout = run.layout
    if layout.stages > 1:
        split = ", ".join(f"{k}: {'+'.join(str(len(layout.chunk_layers(k, c))) for c in range(layout.chunks))}"
                          for k in range(layout.stages))
        schedule = "interleaved" if layout.chunks > 1 else "1F1B"
        log.info(f"pipeline: {layout.stages} stages, {schedule}, blocks per stage {{{split}}}, "
                 f"{micro_per_step} micro-batches per step, bubble (P-1)/(v*m+P-1) = "
                 f"{theoretical_bubble(micro_per_step, layout.stages, layout.chunks):.3f}")
    if lg.print_schedule:
        log.info("schedule:\n" + format_schedule(
            [build_schedule(micro_per_step, layout.stages, k, layout.chunks)
             for k in range(layout.stages)], layout.chunks))
    if run.plans is not None:
        budget = cfg.parallel.activation_memory_budget_gb * GIB
        for plan in run.plans:
            log.info(f"recompute plan: {plan.describe(budget)}")
    log.info(f"model: {cfg.preset or 'custom'} | block {m.block_type} | layers {m.num_layers} "
             f"| hidden {m.hidden_size} | heads {m.num_attention_heads} | ffn {m.ffn_hidden_size} "
             f"| patch {m.patch_dim} | image {m.img_h}x{m.img_w}x{m.num_channels} "
             f"| tokens {m.seq_length} | pooling {m.pooling} | classes {m.num_classes} "
             f"| parameters {_count(total_params)} | gflops_per_image_fwd "
             f"{model.estimate_flops(1, training=False) / 1e9:.3f}")
    log.info(f"data: {run.train_set.name} {len(run.train_set)} images | {run.heldout.name} "
             f"{len(run.heldout)} images | global batch {t.global_batch_size} = micro "
             f"{t.micro_batch_size} x {micro_per_step} micro-batches x dp {dp.size}")
    pr, p = cfg.precision, cfg.parallel
    precision = "bf16" if pr.bf16 else "fp16" if pr.fp16 else "fp32"
    scaler = run.scaler
    scaling = ("none" if scaler is None else f"static {scaler.scale:g}"
               if isinstance(scaler, ConstantGradScaler) else f"dynamic from {scaler.scale:g}")
    log.info(f"precision: {precision} parameters and activations | gradients in "
             f"{str(run.buffers.grad_buffer.dtype).replace('torch.', '')} | loss scaling "
             f"{scaling} | optimizer {run.optimizer.implementation}, "
             f"{'sharded over ' + str(dp.size) + ' DP ranks' if p.use_distributed_optimizer else 'not sharded'}"
             f" | gradient buckets {len(run.buffers.buckets)}"
             f"{', reduced during backward' if p.overlap_grad_reduce else ''}")
    log.info(f"mfu peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_source})")

    watch = Stopwatch(pstate.device)
    loss_sum, steps_since_log = torch.zeros((), device=pstate.device), 0
    last: dict[str, Any] = {}
    eval_seconds = 0.0
    skipped = 0
    memory_logged = False
    ck = cfg.checkpoint
    first = resume(run, ck.load, log.info)
    model.train()
    for iteration, micro_batches in zip(range(first, t.train_iters),
                                        run.batches(first, t.train_iters)):
        result = run.step(iteration, micro_batches)
        if not memory_logged and not result.skipped:  # Adam's state exists after a real step
            log.info(memory_per_parameter_line(run))
            memory_logged = True
        loss_sum += result.loss
        skipped += int(result.skipped)
        steps_since_log += 1
        done = iteration + 1
        log.progress(done)
        if done % lg.log_interval == 0 or done == t.train_iters:
            elapsed = watch.lap()
            step_time = elapsed / steps_since_log
            achieved = flops_per_step / step_time / pstate.world_size
            last = {
                "iteration": done,
                "loss": (loss_sum / steps_since_log).item(),
                "lr": result.lr,
                "grad_norm": result.grad_norm.item(),
                "images_per_second": t.global_batch_size / step_time,
                "step_time_ms": step_time * 1e3,
                "tflops_per_device": achieved / 1e12,
                "mfu": achieved / peak,
                **gpu.read(),
                **({"loss_scale": result.loss_scale, "skipped_steps": skipped}
                   if result.loss_scale is not None else {}),
                "eta": format_eta(step_time * (t.train_iters - done)),
            }
            log.train(last)
            loss_sum.zero_()
            steps_since_log = 0
        if lg.eval_interval and done % lg.eval_interval == 0 and done != t.train_iters:
            eval_start = time.perf_counter()
            log.eval({"iteration": done, **run.evaluate()})
            eval_seconds += time.perf_counter() - eval_start
            watch.lap()  # keep evaluation out of the training throughput
        if ck.save and ((ck.save_interval and done % ck.save_interval == 0)
                        or done == t.train_iters):
            save_start = time.perf_counter()
            save_checkpoint(run, ck.save, done, ck.keep_last_checkpoints, log.info)
            eval_seconds += time.perf_counter() - save_start
            watch.lap()  # nor saving
    train_time = watch.total() - eval_seconds
    eval_record = {"iteration": t.train_iters, **run.evaluate()}
    log.eval(eval_record)
    summary = {
        "iteration": t.train_iters,
        "train_seconds": train_time,
        "loss": last.get("loss", float("nan")),
        "eval_loss": eval_record["eval_loss"],
        "eval_accuracy": eval_record["eval_accuracy"],
        "images_per_second": (t.global_batch_size * (t.train_iters - first) / train_time
                              if train_time > 0 else 0.0),
    }
    log.summary(summary)
    return summary
