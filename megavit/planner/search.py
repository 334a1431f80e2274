"""The planner's search: every layout of a model on N GPUs, its memory and step time.

    model = PlannedModel.vit(cfg)             # or PlannedModel.gpt(layers, hidden, ...)
    for c in search(model, gpu, num_gpus=256, gpus_per_node=8, global_batch=4096):
        c.layout, c.step.step_s, c.mfu, c.memory["total"], c.fits

Searched: TP (dividing the heads and the MLP width, at most a node), PP (dividing the
blocks), virtual stages (interleaved, when the micro-batches divide by PP), DP (the rest),
micro-batch (powers of two dividing the per-rank batch), SP (at TP > 1), recomputation
(none / selective / full) and the distributed optimizer (ZeRO-1, at DP > 1). Full sharding
(--data-parallel-sharding-strategy full: FSDP2 / ZeRO-3, parameters, gradients and
optimizer state over DP, one unit per block) with `full_sharding=True` (it doubles the
search).

Memory per GPU is the worst pipeline stage's: for a ViT `memory.memory_per_stage` (its
counts equal a run's: tests/test_tensor_parallel.py, tests/test_pipeline_memory.py); for a
GPT decoder Korthikanti et al.'s per-layer activations with flash attention (no s x s
term) and the embedding on the first stage. A layout fits when that total is at most
`MEMORY_FRACTION` of the device's memory (what is not counted — the CUDA context,
allocator fragmentation, communication buffers — must fit in the rest).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterator

from megavit.config import Config
from megavit.models.vit import vit_flops
from megavit.parallel.schedules import build_schedule, in_flight
from megavit.planner.hardware import GpuSpec
from megavit.planner.memory import memory_per_stage
from megavit.planner.step_time import (PlanLayout, StepPrediction, TransformerShape,
                                       fsdp_unit, gpt_shape, model_flops, predict_step,
                                       vit_shape)
from megavit.training.optimizer import formula_bytes_per_parameter

MEMORY_FRACTION = 0.9
RECOMPUTE = ("none", "selective", "full")


@dataclass
class PlannedModel:
    """A model to plan: its shape for the time model, and for a ViT its training Config
    (memory and FLOPs are then megavit's own counts)."""

    shape: TransformerShape
    config: Config | None = None

    @classmethod
    def vit(cls, cfg: Config) -> "PlannedModel":
        return cls(vit_shape(cfg.model), cfg)

    @classmethod
    def gpt(cls, layers: int, hidden: int, heads: int, seq: int, vocab: int,
            ffn: int | None = None) -> "PlannedModel":
        return cls(gpt_shape(layers, hidden, heads, seq, vocab, ffn))


@dataclass
class Candidate:
    layout: PlanLayout
    step: StepPrediction
    memory: dict[str, float]          # bytes on the worst stage's GPU, by component + total
    fits: bool
    mfu: float
    samples_per_second: float

    def to_json(self) -> dict:
        lay = self.layout
        return {"tp": lay.tp, "pp": lay.pp, "virtual_stages": lay.chunks, "dp": lay.dp,
                "sequence_parallel": lay.sequence_parallel, "recompute": lay.recompute,
                "micro_batch": lay.micro_batch, "global_batch": lay.global_batch,
                "distributed_optimizer": lay.distributed_optimizer,
                "full_sharding": lay.full_sharding,
                "step_time_s": self.step.step_s, "samples_per_second": self.samples_per_second,
                "mfu": self.mfu, "memory_gib_per_gpu": self.memory["total"] / 2**30,
                "memory_gib": {k: v / 2**30 for k, v in self.memory.items()},
                "fits": self.fits, "time_s": dict(self.step.parts)}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(model: PlannedModel, num_gpus: int, gpus_per_node: int, global_batch: int,
            micro_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
            full_sharding: bool = False) -> Iterator[PlanLayout]:
    """Every layout the search considers (see the module docstring)."""
    s = model.shape
    for tp in _divisors(min(s.heads, gpus_per_node)):
        if s.heads % tp or s.ffn % tp or num_gpus % tp:
            continue
        for pp in _divisors(s.layers):
            if num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            per_stage = s.layers // pp
            for mb in micro_batches:
                if per_rank % mb:
                    continue
                m = per_rank // mb
                chunk_options = [1] + ([per_stage // k for k in _divisors(per_stage)
                                        if 1 < per_stage // k]
                                       if pp > 1 and m % pp == 0 else [])
                for chunks in chunk_options:
                    for sp in ([False, True] if tp > 1 else [False]):
                        for recompute in RECOMPUTE:
                            for zero1 in ([False, True] if dp > 1 else [False]):
                                yield PlanLayout(tp, pp, dp, chunks, sp, recompute, mb,
                                                 global_batch, zero1)
                            if full_sharding and dp > 1:
                                yield PlanLayout(tp, pp, dp, chunks, sp, recompute, mb,
                                                 global_batch, full_sharding=True)


def evaluate(model: PlannedModel, layout: PlanLayout, gpu: GpuSpec, gpus_per_node: int,
             precision: str = "bf16", memory: Callable | None = None) -> Candidate:
    """One layout's prediction (memory: `memory_of`, or a caching wrapper of it)."""
    step = predict_step(model.shape, layout, gpu, gpus_per_node, precision=precision)
    mem = (memory or memory_of)(model, layout, precision)
    samples = layout.global_batch / step.step_s
    flops = (vit_flops(model.config.model, layout.global_batch) if model.config is not None
             else model_flops(model.shape, layout.global_batch))
    mfu = flops / (step.step_s * layout.gpus * gpu.peak_flops(precision))
    return Candidate(layout, step, mem, mem["total"] <= MEMORY_FRACTION * gpu.memory_bytes,
                     mfu, samples)


def memory_of(model: PlannedModel, layout: PlanLayout, precision: str = "bf16",
              held_cache: dict | None = None) -> dict[str, float]:
    """Bytes per GPU on the worst pipeline stage, by component. A ViT's full sharding is
    `memory_per_stage`'s (fp32 shards, and the parameters gathered while units run, as
    "gathered"); a GPT's on paper: the parameters, gradients and optimizer state are 1/DP
    shards, plus two gathered units (one block's 16-bit parameters each: the one running
    and the one prefetched) and one unit's fp32 gradients before their reduce-scatter."""
    if model.config is not None:
        flat = dataclasses.replace(layout, distributed_optimizer=layout.distributed_optimizer
                                   and not layout.full_sharding)
        stages = memory_per_stage(vit_config(model.config, flat, precision), layout.dp,
                                  held_cache)
        worst = max(stages, key=lambda m: m.total)
        out = {"parameters": worst.parameters, "gradients": worst.gradients,
               "optimizer": worst.optimizer, "activations": worst.activations}
        if layout.full_sharding:
            out["gathered"] = worst.gathered
            out["total"] = sum(out.values())
            return out
        held = worst.held_parameters
    else:
        out = gpt_memory(model.shape, layout)
        out.pop("total")
        held = out["gradients"] / 4
    if layout.full_sharding:
        unit = fsdp_unit(model.shape, layout.tp)
        d = layout.dp
        out = {"parameters": out["parameters"] / d + 2 * unit * 2,
               "gradients": out["gradients"] / d + unit * 4,
               "optimizer": held * 12 / d, "activations": out["activations"]}
    out["total"] = sum(out.values())
    return out


def vit_config(cfg: Config, layout: PlanLayout, precision: str = "bf16") -> Config:
    """`cfg` with the layout's training flags."""
    p = dataclasses.replace(
        cfg.parallel, tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        num_layers_per_virtual_pipeline_stage=(cfg.model.num_layers // (layout.pp *
                                               layout.chunks) if layout.chunks > 1 else None),
        num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
        sequence_parallel=layout.sequence_parallel,
        recompute_granularity=None if layout.recompute == "none" else layout.recompute,
        recompute_method="uniform" if layout.recompute == "full" else None,
        recompute_num_layers=1 if layout.recompute == "full" else None,
        use_distributed_optimizer=layout.distributed_optimizer,
        data_parallel_sharding_strategy="full" if layout.full_sharding else "optimizer",
        pipeline_schedule="auto")           # the planner plans 1F1B / interleaved
    t = dataclasses.replace(cfg.training, micro_batch_size=layout.micro_batch,
                            global_batch_size=layout.global_batch)
    pr = dataclasses.replace(cfg.precision, bf16=precision == "bf16",
                             fp16=precision == "fp16")
    return dataclasses.replace(cfg, parallel=p, training=t, precision=pr)


@functools.lru_cache(maxsize=4096)
def _in_flight(micro_batches: int, stages: int, chunks: int) -> int:
    """Chunk-forwards stage 0 holds at its peak (the most of any stage)."""
    return in_flight(build_schedule(micro_batches, stages, 0, chunks))


def gpt_memory(shape: TransformerShape, layout: PlanLayout) -> dict[str, float]:
    """A GPT decoder's first pipeline stage (the embedding, and the most micro-batches in
    flight), 16-bit parameters and activations, fp32 gradients and Adam state."""
    t, pp, s, b, h = layout.tp, layout.pp, shape.seq, layout.micro_batch, shape.hidden
    layers = shape.layers // pp
    block = 4 * h * h + 2 * h * shape.ffn
    held = (layers * block + shape.head_out * h) / t
    sharded = layout.dp if layout.distributed_optimizer else 1
    per_param = formula_bytes_per_parameter(2, 4, True, sharded)
    sp = layout.sequence_parallel and t > 1
    if layout.recompute == "full":
        per_layer = 2 * s * b * h / (t if sp else 1)             # the block's input
    else:   # flash attention keeps no s x s scores: Korthikanti's 5as/h term drops, and
        # selective recomputation (of the attention core) saves nothing more
        per_layer = s * b * h * (34 / t if sp else 10 + 24 / t)
    chunks_held = _in_flight(layout.micro_batches, pp, layout.chunks)
    activations = chunks_held * (layers // layout.chunks) * per_layer
    out = {"parameters": 2 * held, "gradients": 4 * held,
           "optimizer": (per_param - 6) * held, "activations": activations}
    out["total"] = sum(out.values())
    return out


def search(model: PlannedModel, gpu: GpuSpec, num_gpus: int, gpus_per_node: int,
           global_batch: int, precision: str = "bf16",
           progress: Callable[[int, int], None] | None = None,
           full_sharding: bool = False) -> list[Candidate]:
    """Every layout's prediction, fastest first (those that fit before those that do not).
    `progress(done, total)` is called every 500 layouts; `full_sharding` adds the FSDP
    layouts (on paper)."""
    todo = list(layouts(model, num_gpus, gpus_per_node, global_batch,
                        full_sharding=full_sharding))
    held: dict = {}        # each stage of each (TP, PP, v) built once

    def cached_memory(m: PlannedModel, lay: PlanLayout, prec: str) -> dict[str, float]:
        return memory_of(m, lay, prec, held)

    out = []
    for i, layout in enumerate(todo, 1):
        out.append(evaluate(model, layout, gpu, gpus_per_node, precision, cached_memory))
        if progress is not None and (i % 500 == 0 or i == len(todo)):
            progress(i, len(todo))
    return sorted(out, key=lambda c: (not c.fits, c.step.step_s))
