"""Per-GPU memory of a training layout, by component, on paper.

    stages = memory_per_stage(cfg, dp=8)     # cfg: the training flags' Config
    worst = max(stages, key=lambda m: m.total)
    worst.parameters, worst.gradients, worst.optimizer, worst.activations

Every count is one megavit already measures, so the planner's figures can be checked
against a run (tests/test_tensor_parallel.py does, per layout):

    parameters   the parameters a rank of the stage holds — its part of the model built on
                 the meta device, exactly as a run builds it — times their bytes (4 in
                 fp32, 2 in bf16 / fp16)
    gradients    the same count times the gradient buffer's bytes (fp32 but for fp16
                 without --accumulate-allreduce-grads-in-fp32, as training/run.py builds it)
    optimizer    fp32 Adam moments (8 bytes) and, with 16-bit parameters, fp32 masters
                 (4 bytes), divided by the DP size with --use-distributed-optimizer (ZeRO-1):
                 training/optimizer.py's `formula_bytes_per_parameter`, which the run's
                 "memory per trained parameter" line checks against what it allocated
    full         with --data-parallel-sharding-strategy full the parameters a rank holds
    sharding     are its dim-0 shards, as FSDP2 cuts them, in fp32 for parameters,
                 gradients and moments (16 bytes per held element); `gathered` adds the
                 parameters all-gathered in the compute dtype while units run: under
                 pipelining every unit of the stage (kept from forward to backward),
                 otherwise the chunk's root and two blocks
    activations  what the blocks keep for backward per micro-batch (the formula of
                 docs/activation_memory.md, proven against autograd) summed over the stage's
                 blocks, times the chunk-forwards the stage's schedule holds at its peak
                 (1F1B: P - k micro-batches on stage k; interleaved: more)

Not counted yet: the embedding's and the head's activations, communication buffers, the
allocator's fragmentation and the CUDA context — the planner's `docs/planner.md` says how
its totals compare with measured peaks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from megavit.config import Config, ModelConfig, ParallelConfig
from megavit.models.activation_memory import (ActivationSetup, carried_feature_bytes,
                                              recomputed_stack_bytes, region_input_bytes)
from megavit.models.transformer import Runtime
from megavit.models.vit import StageModel, VisionTransformer
from megavit.parallel.comm import CommStats, Group
from megavit.parallel.pipeline_layout import PipelineLayout
from megavit.parallel.schedules import build_schedule, in_flight
from megavit.training.optimizer import formula_bytes_per_parameter
from megavit.training.run import pipeline_layout, sequence_parallel_mode


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of pipeline stage `stage` (TP rank 0: every TP rank holds the same
    up to the replicated parameters, which TP rank 0 also holds)."""

    stage: int
    held_parameters: int         # elements
    parameters: float
    gradients: float
    optimizer: float
    activations: float
    in_flight: int               # chunk-forwards held at the peak
    gathered: float = 0.0        # full sharding: parameters all-gathered while units run

    @property
    def total(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.activations
                + self.gathered)


def _rows(shape) -> tuple[int, int]:
    """(rows, elements per row) of a parameter shape, dim 0 being the rows."""
    shape = tuple(shape)
    return (shape[0], int(torch.Size(shape[1:]).numel())) if shape else (1, 1)


def shard_rows(param: "torch.Tensor | torch.Size", dp: int, dp_rank: int = 0) -> int:
    """Elements of a parameter (or its shape) that DP rank `dp_rank` holds when FSDP2
    shards it along dim 0 (rows [r*c, min((r+1)*c, n)), c = ceil(n/dp))."""
    n, row = _rows(getattr(param, "shape", param))
    c = -(-n // dp)
    return max(0, min((dp_rank + 1) * c, n) - min(dp_rank * c, n)) * row


def padded_elements(params: "list[torch.Tensor] | list[torch.Size]", dp: int) -> int:
    """What FSDP2 all-gathers (and reduce-scatters) for these parameters (or shapes): each
    padded to dp x ceil(rows / dp) rows."""
    total = 0
    for p in params:
        n, row = _rows(getattr(p, "shape", p))
        total += dp * -(-n // dp) * row
    return total


def unit_shapes(stage: StageModel) -> list[tuple[list, list[list]]]:
    """Per chunk of `stage`: (the shapes of the root unit's parameters — embedding, head
    and whatever is not in a block —, [each block unit's parameter shapes]): the units
    `parallel.full_sharding.apply_full_sharding` makes."""
    out = []
    for chunk in stage.chunks:
        inside = {id(p) for b in chunk.blocks.values() for p in b.parameters()}
        out.append(([p.shape for p in chunk.parameters() if id(p) not in inside],
                    [[p.shape for p in b.parameters()] for b in chunk.blocks.values()]))
    return out


def full_sharding_units(stage: StageModel | list, dp: int) -> list[tuple[int, list[int]]]:
    """Per chunk: (the root unit's padded elements, [each block unit's padded elements])
    at DP size `dp`, from a stage model or its `unit_shapes`."""
    shapes = unit_shapes(stage) if isinstance(stage, StageModel) else stage
    return [(padded_elements(root, dp), [padded_elements(b, dp) for b in blocks])
            for root, blocks in shapes]


def stage_on_meta(model: ModelConfig, layout: PipelineLayout, stage: int, tp: int,
                  tp_rank: int = 0, parallel: ParallelConfig | None = None) -> StageModel:
    """The part of the model that (stage, tp_rank) holds, built on the meta device (no
    memory), as a run with the `parallel` flags builds it (SP marks some gradients partial
    over TP)."""
    group = Group("tp", tuple(range(tp)), tp_rank, None, CommStats())
    rt = Runtime.from_config(parallel, group, 0) if parallel is not None else Runtime(group)
    with torch.device("meta"):
        return StageModel([VisionTransformer(model, rt, layout.chunk_layers(stage, c),
                                             layout.is_first(stage, c), layout.is_last(stage, c))
                           for c in range(layout.chunks)])


def held_parameters(model: ModelConfig, layout: PipelineLayout, stage: int, tp: int,
                    tp_rank: int = 0) -> int:
    """Parameters (elements) that rank (stage, tp_rank) holds."""
    return sum(p.numel() for p in stage_on_meta(model, layout, stage, tp, tp_rank).parameters())


def activation_setup(cfg: Config) -> ActivationSetup:
    """The activation formula's setting for these flags (one micro-batch on one TP rank)."""
    p = cfg.parallel
    recompute = p.recompute_granularity if p.recompute_granularity in ("selective",
                                                                       "full") else None
    return ActivationSetup(tp=p.tensor_model_parallel_size,
                           micro_batch=cfg.training.micro_batch_size,
                           sequence_parallel=sequence_parallel_mode(cfg), recompute=recompute,
                           recompute_method=p.recompute_method,
                           recompute_num_layers=p.recompute_num_layers or 1,
                           bytes_per_element=2 if cfg.precision.bf16 or cfg.precision.fp16
                           else 4)


def memory_per_stage(cfg: Config, dp: int, held_cache: dict | None = None
                     ) -> list[StageMemory]:
    """The memory of a GPU of each pipeline stage for the flags `cfg` at data-parallel size
    `dp` (the global batch gives the micro-batches per step). `held_cache`: a dict kept
    across calls for the same model (a search), so each stage is built once."""
    p, precision, training = cfg.parallel, cfg.precision, cfg.training
    layout = pipeline_layout(cfg)
    tp = p.tensor_model_parallel_size
    sixteen = precision.bf16 or precision.fp16
    param_bytes = 2 if sixteen else 4
    grad_bytes = 2 if precision.fp16 and not precision.accumulate_allreduce_grads_in_fp32 \
        else 4
    full = p.data_parallel_sharding_strategy == "full"
    shards = dp if p.use_distributed_optimizer else 1
    optimizer_bytes = formula_bytes_per_parameter(param_bytes, grad_bytes, sixteen, shards) \
        - param_bytes - grad_bytes
    if full:   # fp32 shards of parameters (the masters), gradients and moments
        optimizer_bytes, gathered_bytes = 8, param_bytes
        param_bytes = grad_bytes = 4
    micro_batches = training.global_batch_size // (training.micro_batch_size * dp)
    setup = activation_setup(cfg)
    cache = held_cache if held_cache is not None else {}
    out = []
    for stage in range(layout.stages):
        key = (layout, stage, tp)
        if key not in cache:      # the stage built once: its parameters' shapes by unit
            shapes = unit_shapes(stage_on_meta(cfg.model, layout, stage, tp))
            cache[key] = (sum(torch.Size(q).numel() for root, blocks in shapes
                              for q in [*root, *(x for b in blocks for x in b)]), shapes)
        held, shapes = cache[key]
        gathered = 0
        if full:
            held = sum(shard_rows(q, dp) for root, blocks in shapes
                       for q in [*root, *(x for b in blocks for x in b)])
            units = full_sharding_units(shapes, dp)
            # under pipelining every unit stays gathered from forward to backward;
            # otherwise the root and one block at a time (plus the next, prefetched)
            gathered = (sum(r + sum(b) for r, b in units) if layout.stages > 1 else
                        max(r + 2 * max(b, default=0) for r, b in units))
        flight = in_flight(build_schedule(micro_batches, layout.stages, stage, layout.chunks,
                                          zero_bubble=p.pipeline_schedule == "zb-h1"))
        per_chunk = max(chunk_activation_bytes(cfg.model, setup, layout.chunk_layers(stage, c))
                        for c in range(layout.chunks))
        out.append(StageMemory(stage, held, held * param_bytes, held * grad_bytes,
                               held * optimizer_bytes, flight * per_chunk, flight,
                               gathered * gathered_bytes if full else 0.0))
    return out


def chunk_activation_bytes(model: ModelConfig, setup: ActivationSetup, layers: range) -> float:
    """What one micro-batch's forward through the blocks `layers` (one chunk) keeps for
    backward: every block's activations, or under full recomputation the inputs of its
    regions (uniform: every --recompute-num-layers blocks from the chunk's first; block:
    the first --recompute-num-layers blocks each on its own, the others kept whole)."""
    if setup.recompute != "full":
        return recomputed_stack_bytes(model, setup, layers, 0)
    plain = dataclasses.replace(setup, recompute=None)
    k = setup.recompute_num_layers
    if setup.recompute_method == "block":
        return recomputed_stack_bytes(model, plain, layers, min(k, len(layers)))
    return (sum(region_input_bytes(model, plain, l) for l in layers[::k])
            + 8 * setup.micro_batch + carried_feature_bytes(model, plain, layers[0]))
