"""The engine of one training run, and the `Task` protocol a workload plugs into it.

    task = ClassificationTask(cfg)                # or ImageTextTask(cfg), ... (megavit.tasks)
    run = Run.build(task, pstate)                 # this rank's part of everything
    result = run.step(iteration, batch)           # one optimizer step (training/step.py)
    summary = train(run, log)                     # the loop (training/loop.py)

`Run.build` does, for every task, in this order: the task reads its data and fixes the
config (`prepare`); the blocks are split over the pipeline stages and the schedule checked;
the dropout RNG streams and the `Runtime` (TP group, SP, recomputation, with a per-stage
plan under --recompute-granularity auto) are made; the task builds this stage's model; the
gradient buffer (over the task's trainable parameters), the optimizer, the loss scaler, the
lr schedule, the data sampler and the pipeline executor follow from the flags.

A task supplies only what is particular to its workload:

    config                     the flags' Config: the engine reads its parallel, training,
                               precision, logging and checkpoint sections
    prepare(pstate)            read the data; return the run's Config (e.g. with the class
                               count the dataset fixed)
    build_model(...)           this pipeline stage's part of the model
    trainable_parameters(m)    what the gradient buffer and the optimizer hold
    lr_scale(name)             the multiple of the lr a parameter trains at (1; e.g.
                               layer-wise decay)
    train_size, batches(...)   the training set's size (the sampler's range) and this
                               rank's batches of iterations [start, stop)
    micro_batch_count(batch)   how many micro-batches one step's batch holds
    forward_backward(...)      this rank's forward and backward of one step: the loss times
                               the loss scale is back-propagated; returns the loss summed
                               over the micro-batches (on the last stage)
    evaluate(run)              held-out metrics, the same on every rank
    describe()                 the model sections of a checkpoint's megavit_config.json
    checkpoint_files()         files saved beside the tensors (e.g. a tokenizer)
    log lines and fields       its start-up lines, the throughput's unit, FLOPs per step
                               (None: no MFU), extra fields of a training line, the
                               summary's evaluation fields

`megavit/tasks/classification.py` is the smallest complete task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from megavit.config import Config, ConfigError
from megavit.data.sampler import GlobalBatchSampler
from megavit.models.activation_memory import ActivationSetup
from megavit.models.transformer import Runtime
from megavit.parallel.data_parallel import DataParallelBuffers
from megavit.parallel.full_sharding import FullyShardedGradients, apply_full_sharding
from megavit.parallel.pipeline_executor import PipelineExecutor, StepStats
from megavit.parallel.pipeline_layout import PipelineLayout, PipelineLayoutError
from megavit.parallel.random import RNGTracker
from megavit.parallel.schedules import ScheduleError, build_schedule
from megavit.parallel.state import ParallelState
from megavit.parallel.weight_grad import WeightGradStore, defer_weight_gradients
from megavit.training.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megavit.training.lr_schedule import LRSchedule
from megavit.training.optimizer import MixedPrecisionOptimizer
from megavit.training.peak_flops import configure_tf32
from megavit.training.recompute_plan import GIB, StagePlan, plan_all_stages
from megavit.training.step import StepResult, nan_check, train_step


class Task(Protocol):
    """One workload the engine trains (the module docstring describes each member)."""

    config: Config                # the engine's sections (parallel, training, precision,
                                  # logging, checkpoint) and the (image) model
    throughput_unit: str          # "images": images_per_second in the logs

    def prepare(self, pstate: ParallelState) -> Config: ...

    def build_model(self, runtime: Runtime, layout: PipelineLayout, stage: int,
                    pstate: ParallelState, dtype: torch.dtype) -> nn.Module: ...

    def trainable_parameters(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]: ...

    def lr_scale(self, name: str) -> float: ...

    @property
    def train_size(self) -> int: ...

    def batches(self, run: "Run", start: int, stop: int) -> Iterator[Any]: ...

    def micro_batch_count(self, batch: Any) -> int: ...

    def forward_backward(self, run: "Run", batch: Any, loss_scale: float | None,
                         measure: bool) -> tuple[torch.Tensor, StepStats | None]: ...

    def evaluate(self, run: "Run") -> dict[str, float]: ...

    def describe(self) -> dict[str, dict]: ...

    def checkpoint_files(self) -> dict[str, bytes]: ...

    def log_lines(self, run: "Run") -> list[str]: ...

    def flops_per_step(self, run: "Run") -> float | None: ...

    def train_fields(self, run: "Run") -> dict[str, float]: ...

    def summary_fields(self, evaluation: dict[str, float]) -> dict[str, float]: ...


def param_dtype(precision) -> torch.dtype:
    """The parameters' and activations' dtype: --bf16, --fp16 or fp32."""
    return torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32


def loss_scaler(precision) -> ConstantGradScaler | DynamicGradScaler | None:
    """--loss-scale: static; fp16 without it: dynamic; otherwise none."""
    if precision.loss_scale is not None:
        return ConstantGradScaler(precision.loss_scale)
    if precision.fp16:
        return DynamicGradScaler(precision.initial_loss_scale, precision.min_loss_scale,
                                 window=precision.loss_scale_window,
                                 hysteresis=precision.hysteresis)
    return None


def bucket_elements(parallel, dp_size: int) -> int:
    """--ddp-bucket-size, or by default max(40 M, 1 M x DP) elements (Megatron's)."""
    return parallel.ddp_bucket_size or max(40_000_000, 1_000_000 * dp_size)


def gradient_buffers(named_params: list, cfg: Config, pstate: ParallelState
                     ) -> DataParallelBuffers:
    """The data-parallel gradient buffer of `named_params` as the parallel and precision
    flags say (bucket size, sharding, overlap, gradient dtype, NaN check)."""
    precision, parallel = cfg.precision, cfg.parallel
    grad_dtype = torch.float16 if precision.fp16 and \
        not precision.accumulate_allreduce_grads_in_fp32 \
        else torch.float32                  # bf16 gradients always in fp32 (Megatron)
    return DataParallelBuffers(
        named_params, pstate.dp, pstate.tp, grad_dtype,
        bucket_elements(parallel, pstate.dp.size),
        shard=parallel.use_distributed_optimizer, overlap=parallel.overlap_grad_reduce,
        check_finite=nan_check(precision))


def fully_sharded_gradients(task: "Task", model: nn.Module, cfg: Config, pstate: ParallelState,
                            layout: PipelineLayout, dtype: torch.dtype
                            ) -> FullyShardedGradients:
    """--data-parallel-sharding-strategy full: FSDP2 units on this stage's chunks (built in
    fp32), and the gradient side the optimizer reads. ConfigError for a model without
    chunks of blocks."""
    chunks = list(getattr(model, "chunks", []))
    if not chunks or not all(hasattr(c, "blocks") for c in chunks):
        raise ConfigError("--data-parallel-sharding-strategy full: this task's model is not "
                          "a stage of ViT chunks; use the default strategy")
    units = apply_full_sharding(chunks, pstate.mesh["dp"], dtype, pipelined=layout.stages > 1)
    return FullyShardedGradients(task.trainable_parameters(model), units, pstate.dp, pstate.tp,
                                 check_finite=nan_check(cfg.precision))


def lr_schedule(training) -> LRSchedule:
    """--lr, --min-lr, warm-up and decay (over --lr-decay-iters, default --train-iters)."""
    return LRSchedule(training.lr, training.min_lr, training.lr_warmup_iters,
                      training.lr_decay_iters or training.train_iters, training.lr_decay_style)


def schedule_description(training) -> dict[str, Any]:
    """The flags that fix the lr and the data position of every iteration (recorded in a
    checkpoint, so a resume with other values can say so)."""
    return {k: getattr(training, k) for k in (
        "train_iters", "global_batch_size", "lr", "min_lr", "lr_warmup_iters",
        "lr_decay_iters", "lr_decay_style", "seed")}


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


def sequence_parallel_mode(cfg: Config) -> str | None:
    """"keep" / "regather" under --sequence-parallel at TP > 1, else None."""
    p = cfg.parallel
    if p.sequence_parallel and p.tensor_model_parallel_size > 1:
        return "regather" if p.sequence_parallel_regather else "keep"
    return None


def zero_bubble(cfg: Config) -> bool:
    """--pipeline-schedule zb-h1: backward split into B and W passes."""
    return cfg.parallel.pipeline_schedule == "zb-h1"


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
                           p.activation_memory_budget_gb * GIB, zero_bubble(cfg))


def check_schedule(cfg: Config, layout: PipelineLayout, dp_size: int) -> int:
    """The number of micro-batches per step, checked against the schedule; ConfigError
    when the schedule cannot run it. Also checks block recomputation against the stages,
    and that a --recompute-granularity auto budget fits a plan."""
    t = cfg.training
    m = t.global_batch_size // (t.micro_batch_size * dp_size)
    try:
        build_schedule(m, layout.stages, 0, layout.chunks, zero_bubble=zero_bubble(cfg))
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    p = cfg.parallel
    if p.recompute_granularity == "full" and p.recompute_method == "block":
        per_chunk = min(len(layout.chunk_layers(k, 0)) for k in range(layout.stages))
        if p.recompute_num_layers > per_chunk:
            raise ConfigError(f"--recompute-num-layers {p.recompute_num_layers} (method block) "
                              f"is more than the {per_chunk} blocks of a pipeline stage's chunk")
    recompute_plans(cfg, layout, m, sequence_parallel_mode(cfg))
    return m


def stage_runtime(cfg: Config, pstate: ParallelState, layout: PipelineLayout,
                  micro_batches: int) -> tuple[Runtime, list[StagePlan] | None]:
    """This stage's `Runtime` (TP group, SP, recomputation; under --recompute-granularity
    auto the stage's planned number of recomputed blocks) and every stage's plan."""
    t = cfg.training
    stage = pstate.pp.rank
    # Each stage seeds its dropout streams apart: its layers are different layers.
    rng = RNGTracker(t.seed + 100 * stage, pstate.tp.rank, pstate.device)
    runtime = Runtime.from_config(cfg.parallel, pstate.tp, t.seed, rng, t.layernorm_impl)
    plans = recompute_plans(cfg, layout, micro_batches, runtime.sequence_parallel)
    if plans is not None:
        n = plans[stage].recomputed
        runtime = dataclasses.replace(runtime, recompute_granularity="full" if n else None,
                                      recompute_method="block", recompute_num_layers=n or 1)
    return runtime, plans


@dataclass
class Run:
    """Everything one training run holds on this rank: the task, this pipeline stage's
    part of its model, the gradient buffer, optimizer, loss scaler, lr schedule, sampler
    and pipeline executor. Checkpoints read and write it (`checkpointing.Checkpointable`)."""

    cfg: Config                    # after the task's prepare (e.g. the class count fixed)
    task: Task
    pstate: ParallelState
    model: nn.Module
    buffers: DataParallelBuffers | FullyShardedGradients
    optimizer: MixedPrecisionOptimizer
    scaler: ConstantGradScaler | DynamicGradScaler | None
    lr_schedule: LRSchedule
    sampler: GlobalBatchSampler
    layout: PipelineLayout
    executor: PipelineExecutor
    micro_batches: int             # per step on this DP rank
    plans: list[StagePlan] | None = None   # --recompute-granularity auto

    @classmethod
    def build(cls, task: Task, pstate: ParallelState) -> "Run":
        cfg = task.prepare(pstate)
        training, precision = cfg.training, cfg.precision
        configure_tf32(precision.tf32)
        layout = pipeline_layout(cfg)
        micro_batches = check_schedule(cfg, layout, pstate.dp.size)
        runtime, plans = stage_runtime(cfg, pstate, layout, micro_batches)
        dtype = param_dtype(precision)
        stage = pstate.pp.rank
        full = cfg.parallel.data_parallel_sharding_strategy == "full"
        # fully sharded, the parameters are fp32 masters; FSDP2 computes in `dtype`
        model = task.build_model(runtime, layout, stage, pstate,
                                 torch.float32 if full else dtype)
        buffers = (fully_sharded_gradients(task, model, cfg, pstate, layout, dtype) if full
                   else gradient_buffers(task.trainable_parameters(model), cfg, pstate))
        weight_grads = None
        if zero_bubble(cfg):     # the linear layers defer dW to the schedule's W passes
            weight_grads = WeightGradStore()
            defer_weight_gradients(model, weight_grads)
        return cls(
            cfg=cfg, task=task, pstate=pstate, model=model, buffers=buffers,
            optimizer=MixedPrecisionOptimizer(buffers, training, pstate,
                                              master_weights=dtype != torch.float32
                                              and not full,
                                              lr_scale=task.lr_scale),
            scaler=loss_scaler(precision), lr_schedule=lr_schedule(training),
            sampler=GlobalBatchSampler(task.train_size, training.global_batch_size,
                                       training.seed),
            layout=layout,
            executor=PipelineExecutor(layout, stage, pstate.pp_channels, pstate.device, dtype,
                                      weight_grads),
            micro_batches=micro_batches, plans=plans)

    @property
    def dtype(self) -> torch.dtype:
        return self.executor.dtype

    @property
    def is_first_stage(self) -> bool:
        """This stage holds the model's first chunk (it reads the images)."""
        return any(self.layout.is_first(self.pstate.pp.rank, c) for c in range(self.layout.chunks))

    @property
    def is_last_stage(self) -> bool:
        """This stage holds the model's last chunk (it computes the loss)."""
        return any(self.layout.is_last(self.pstate.pp.rank, c) for c in range(self.layout.chunks))

    def batches(self, start: int, stop: int) -> Iterator[Any]:
        """This rank's batches of iterations [start, stop), as the task reads them."""
        return self.task.batches(self, start, stop)

    def step(self, iteration: int, batch: Any = None,
             on_gradients: Callable[[nn.Module], None] | None = None,
             measure: bool = False) -> StepResult:
        """One optimizer step on `batch` (from `batches`; read now when None).
        `on_gradients(model)`, if given, sees the reduced gradients before the optimizer;
        `measure`: record the saved activation bytes."""
        if batch is None:
            batch = next(iter(self.batches(iteration, iteration + 1)))
        return train_step(self, iteration, batch, on_gradients, measure)

    def evaluate(self) -> dict[str, float]:
        return self.task.evaluate(self)

    def describe(self) -> dict[str, Any]:
        """What a checkpoint's `megavit_config.json` records: the task's model sections,
        the layout this rank's run has, and the precision (the iteration is added when
        saving)."""
        p = self.pstate
        return {**self.task.describe(),
                "layout": {"tp": p.tp.size, "pp": p.pp.size, "dp": p.dp.size,
                           "virtual_stages": self.layout.chunks,
                           "distributed_optimizer": self.buffers.shard
                           and self.buffers.strategy == "optimizer",
                           "sharding": self.buffers.strategy},
                "precision": dataclasses.asdict(self.cfg.precision),
                "schedule": schedule_description(self.cfg.training)}

    def checkpoint_files(self) -> dict[str, bytes]:
        return self.task.checkpoint_files()

    @property
    def rng(self) -> RNGTracker | None:
        """The dropout RNG streams of this rank's model (restored at the same layout)."""
        return self.model.rt.rng
