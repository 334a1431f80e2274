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
from megavit.models.vit import Runtime, build_vit
from megavit.parallel.random import RNGTracker
from megavit.parallel.state import ParallelState
from megavit.training.lr_schedule import LRSchedule
from megavit.training.metrics import GpuMonitor, MetricsLogger, Stopwatch, format_eta
from megavit.training.optimizer import build_optimizer
from megavit.training.peak_flops import configure_tf32, device_peak_flops
from megavit.training.step import StepResult, classification_loss, train_step


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, pstate: ParallelState,
             global_batch_size: int, micro_batch_size: int,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean loss and top-1 accuracy over the held-out split (or its first `max_batches`
    global batches), summed over DP ranks: the same images in every layout."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=pstate.device)  # loss, correct, count
    for images, labels, _ in eval_batches(dataset, global_batch_size, pstate.dp.rank,
                                          pstate.dp.size, micro_batch_size, max_batches):
        if labels.numel() == 0:
            continue
        images, labels = images.to(pstate.device), labels.to(pstate.device)
        logits = model(images).float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += (logits.argmax(dim=-1) == labels).sum()
        sums[2] += labels.numel()
    pstate.dp.all_reduce(sums)
    model.train()
    count = max(sums[2].item(), 1.0)
    return {"eval_loss": sums[0].item() / count, "eval_accuracy": sums[1].item() / count,
            "eval_images": int(sums[2].item())}


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
    """Everything one training run holds, built the same way for `pretrain` and tests."""

    cfg: Config
    pstate: ParallelState
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_set: Dataset
    heldout: Dataset
    sampler: GlobalBatchSampler

    @classmethod
    def build(cls, cfg: Config, pstate: ParallelState) -> "TrainingRun":
        t = cfg.training
        configure_tf32(cfg.precision.tf32)
        train_set, heldout = build_datasets(cfg.data, cfg.model, t.seed)
        cfg = _resolve_num_classes(cfg, train_set)
        rng = RNGTracker(t.seed, pstate.tp.rank, pstate.device)
        runtime = Runtime.from_config(cfg.parallel, pstate.tp, t.seed, rng)
        model = build_vit(cfg.model, runtime, t.seed, pstate.device)
        return cls(
            cfg=cfg, pstate=pstate, model=model, optimizer=build_optimizer(model, t),
            schedule=LRSchedule(t.lr, t.min_lr, t.lr_warmup_iters,
                                t.lr_decay_iters or t.train_iters, t.lr_decay_style),
            loss_fn=classification_loss(t.label_smoothing), train_set=train_set,
            heldout=heldout, sampler=GlobalBatchSampler(len(train_set), t.global_batch_size, t.seed),
        )

    def batches(self, start: int, stop: int) -> Iterator[list[MicroBatch]]:
        """This rank's micro-batches for iterations [start, stop)."""
        t, d, dp = self.cfg.training, self.cfg.data, self.pstate.dp
        return train_batches(self.train_set, self.sampler, start, stop, dp.rank, dp.size,
                             t.micro_batch_size, d.num_workers, d.augment)

    def step(self, iteration: int, micro_batches: list[MicroBatch],
             on_gradients: Callable[[nn.Module], None] | None = None) -> StepResult:
        return train_step(self.model, self.optimizer, self.schedule, iteration, micro_batches,
                          self.pstate, self.loss_fn, self.cfg.training.clip_grad, on_gradients)

    def evaluate(self) -> dict[str, float]:
        t = self.cfg.training
        return evaluate(self.model, self.heldout, self.pstate, t.global_batch_size,
                        t.micro_batch_size, self.cfg.logging.eval_iters)


def pretrain(cfg: Config, pstate: ParallelState) -> dict[str, Any]:
    """Train for --train-iters steps and evaluate; returns the summary metrics."""
    log = MetricsLogger(cfg.logging, pstate.is_main, cfg.training.train_iters)
    try:
        return _train(TrainingRun.build(cfg, pstate), log)
    finally:
        log.close()


def _train(run: TrainingRun, log: MetricsLogger) -> dict[str, Any]:
    cfg, pstate, model = run.cfg, run.pstate, run.model
    m, t, lg = cfg.model, cfg.training, cfg.logging
    dp = pstate.dp
    micro_per_step = t.global_batch_size // (t.micro_batch_size * dp.size)
    total_params = sum(
        p.numel() * (pstate.tp.size if getattr(p, "tp_shard", None) else 1)
        for p in model.parameters())
    flops_per_step = model.estimate_flops(t.global_batch_size, training=True)
    # Only the logging rank needs the MFU denominator (measuring it on CPU takes a moment).
    peak, peak_source = (device_peak_flops(pstate.device, torch.float32, cfg.precision.tf32,
                                           lg.peak_tflops)
                         if pstate.is_main else (float("inf"), ""))
    gpu = GpuMonitor(pstate.device)

    rt = model.rt
    recompute = rt.recompute_granularity or "none"
    if rt.recompute_granularity == "full":
        recompute += f" ({rt.recompute_method}, {rt.recompute_num_layers} layers)"
    sp = rt.sequence_parallel or "off"
    if cfg.parallel.sequence_parallel and pstate.tp.size == 1:
        sp = "off (--sequence-parallel has no effect at TP=1)"
    log.info(f"layout: {pstate.describe()} | sequence parallel {sp} | recompute {recompute}")
    log.info(f"model: {cfg.preset or 'custom'} | block {m.block_type} | layers {m.num_layers} "
             f"| hidden {m.hidden_size} | heads {m.num_attention_heads} | ffn {m.ffn_hidden_size} "
             f"| patch {m.patch_dim} | image {m.img_h}x{m.img_w}x{m.num_channels} "
             f"| tokens {m.seq_length} | pooling {m.pooling} | classes {m.num_classes} "
             f"| parameters {_count(total_params)} | gflops_per_image_fwd "
             f"{model.estimate_flops(1, training=False) / 1e9:.3f}")
    log.info(f"data: {run.train_set.name} {len(run.train_set)} images | {run.heldout.name} "
             f"{len(run.heldout)} images | global batch {t.global_batch_size} = micro "
             f"{t.micro_batch_size} x {micro_per_step} micro-batches x dp {dp.size}")
    log.info(f"mfu peak: {peak / 1e12:.3f} TFLOP/s per device ({peak_source})")

    watch = Stopwatch(pstate.device)
    loss_sum, steps_since_log = torch.zeros((), device=pstate.device), 0
    last: dict[str, Any] = {}
    eval_seconds = 0.0
    model.train()
    for iteration, micro_batches in enumerate(run.batches(0, t.train_iters)):
        result = run.step(iteration, micro_batches)
        loss_sum += result.loss
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
    train_time = watch.total() - eval_seconds
    eval_record = {"iteration": t.train_iters, **run.evaluate()}
    log.eval(eval_record)
    summary = {
        "iteration": t.train_iters,
        "train_seconds": train_time,
        "loss": last.get("loss", float("nan")),
        "eval_loss": eval_record["eval_loss"],
        "eval_accuracy": eval_record["eval_accuracy"],
        "images_per_second": t.global_batch_size * t.train_iters / train_time,
    }
    log.summary(summary)
    return summary
