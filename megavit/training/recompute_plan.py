"""`--recompute-granularity auto`: how many blocks each pipeline stage recomputes.

Under 1F1B, stage k holds the activations of up to P - k micro-batches at once (more with
the interleaved schedule: see `schedules.in_flight`), so early stages need more memory. For
a budget B (bytes of block activations per stage), each stage picks the fewest blocks N to
recompute — full recomputation, the first N blocks of each of its chunks, each on its own —
such that

    in_flight(stage) x max over its chunks of recomputed_stack_bytes(chunk, N)  <=  B

using the formula of docs/activation_memory.md. Every rank can compute every stage's plan
(it depends on the configuration only), so the log shows all of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megavit.config import ConfigError, ModelConfig
from megavit.models.activation_memory import ActivationSetup, recomputed_stack_bytes
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.schedules import build_schedule, in_flight

GIB = 2**30


@dataclass(frozen=True)
class StagePlan:
    stage: int
    in_flight: int        # chunk-forwards held at the peak
    blocks: int           # blocks per chunk
    recomputed: int       # blocks recomputed per chunk (the first ones)
    predicted_bytes: float

    def describe(self, budget: float) -> str:
        return (f"stage {self.stage}: {self.in_flight} micro-batch chunks in flight, recompute "
                f"{self.recomputed} of {self.blocks} blocks per chunk, predicted "
                f"{_size(self.predicted_bytes)} of {_size(budget)} for the blocks' activations")


def plan_stage(cfg: ModelConfig, layout: PipelineLayout, stage: int, num_microbatches: int,
               setup: ActivationSetup, budget_bytes: float,
               zero_bubble: bool = False) -> StagePlan:
    """The fewest recomputed blocks per chunk that keep `stage` under `budget_bytes`."""
    flight = in_flight(build_schedule(num_microbatches, layout.stages, stage, layout.chunks,
                                      zero_bubble=zero_bubble))
    chunks = [layout.chunk_layers(stage, c) for c in range(layout.chunks)]
    blocks = len(chunks[0])
    setup = dataclasses.replace(setup, recompute=None)
    for n in range(blocks + 1):
        need = flight * max(recomputed_stack_bytes(cfg, setup, layers, n) for layers in chunks)
        if need <= budget_bytes:
            return StagePlan(stage, flight, blocks, n, need)
    raise ConfigError(
        f"--activation-memory-budget-gb {budget_bytes / GIB:g} is too small for pipeline stage "
        f"{stage}: even recomputing all {blocks} blocks of each chunk it keeps "
        f"{_size(need)} ({flight} micro-batch chunks in flight); raise the budget or lower "
        "--micro-batch-size")


def _size(n: float) -> str:
    """Bytes with three significant digits in a readable unit."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} bytes"


def plan_all_stages(cfg: ModelConfig, layout: PipelineLayout, num_microbatches: int,
                    setup: ActivationSetup, budget_bytes: float,
                    zero_bubble: bool = False) -> list[StagePlan]:
    return [plan_stage(cfg, layout, k, num_microbatches, setup, budget_bytes, zero_bubble)
            for k in range(layout.stages)]
