"""Bytes a training step sends, per rank, by group and operation, on paper.

    per_stage = step_collective_bytes(cfg, dp=8)     # [{"dp.all_reduce": bytes, ...}, ...]

Counted as megavit's counting layer counts them (`megavit.parallel.comm.CommStats`: the
input of an all-reduce / broadcast / send / receive, the whole gathered or pre-scattered
tensor of an all-gather / reduce-scatter), so the figures can be compared with a run's:

    dp.all_reduce       each gradient bucket (its elements padded to a multiple of DP, in
                        the gradient buffer's dtype) and the step's loss (fp32 [1]); with
                        --use-distributed-optimizer the buckets are reduce-scattered
                        instead and the gradient norm's square (fp64 [1]) is summed here
    dp.reduce_scatter   the buckets, with the distributed optimizer
    dp.all_gather       the updated parameter shards, each bucket in the parameters' dtype,
                        with the distributed optimizer
    (full sharding)     FSDP2's all-gathers of each unit's padded parameters in the compute
                        dtype and reduce-scatters of its fp32 gradients, as the schedule
                        runs them (`full_sharding_traffic`); the loss and the gradient norm
                        on dp.all_reduce; each TP-partial gradient's shard on tp.all_reduce
    pp.send / pp.recv   one activation forward and its gradient back per micro-batch across
                        each boundary between consecutive chunks: [s (/ t under SP, padded),
                        b, h] in the activation dtype
    pp.all_reduce       the gradient norm's square (fp64 [1])
    pp.broadcast        the step's loss from the last stage (fp32 [1])
    world.all_reduce    the NaN / inf flag (fp32 [1]) when the check is on
    tp.all_reduce       without SP, each block's row-parallel output forward and its
                        column-parallel input's gradient backward, [s, b, h] (one each way
                        for the parallel block, two for the sequential one), again for every
                        block recomputed in backward; the MAP head's [b, h] x 2 forward and
                        [h] + [s, b, h] + [b, h] backward; the TP-partial gradient bucket
                        (QK-norms; norms and biases under SP); the gradient norm (fp64 [1])
    tp.all_gather       under SP, each block's column-parallel input forward and its
    tp.reduce_scatter   row-parallel output's gradient backward as all-gather, the output
                        forward and the input's gradient backward as reduce-scatter, of the
                        padded [s, b, h] (plus an all-gather per column-parallel input in
                        backward with --sequence-parallel-regather); the embedding's scatter
                        (an all-gather of its gradient) and the gather before the head

Only groups of more than one rank communicate. Not counted yet: merged grids and carried
feature maps, registers and the distillation token, and 16-bit TP messages of the MAP head
(counted in the activation dtype).
"""

from __future__ import annotations

from collections import Counter

from megavit.config import Config
from megavit.parallel.data_parallel import bucket_layout
from megavit.parallel.partial_grad import has_partial_grad
from megavit.parallel.schedules import build_schedule
from megavit.planner.memory import full_sharding_units, shard_rows, stage_on_meta
from megavit.training.run import bucket_elements, pipeline_layout
from megavit.training.step import nan_check


def step_collective_bytes(cfg: Config, dp: int) -> list[dict[str, int]]:
    """Per pipeline stage, the bytes one rank of it communicates in a training step, by
    "group.operation" (DP, PP and world groups), for the flags `cfg` at data-parallel size
    `dp` (the global batch gives the micro-batches per step)."""
    p, precision, training = cfg.parallel, cfg.precision, cfg.training
    layout = pipeline_layout(cfg)
    tp, pp = p.tensor_model_parallel_size, layout.stages
    sixteen = precision.bf16 or precision.fp16
    param_bytes = 2 if sixteen else 4
    grad_bytes = 2 if precision.fp16 and not precision.accumulate_allreduce_grads_in_fp32 \
        else 4
    micro = training.global_batch_size // (training.micro_batch_size * dp)
    out = []
    for stage in range(pp):
        got: Counter = Counter()
        model = stage_on_meta(cfg.model, layout, stage, tp, 0, p)
        params = list(model.parameters())
        full = p.data_parallel_sharding_strategy == "full"
        if full and dp > 1:
            actions = build_schedule(micro, pp, stage, layout.chunks,
                                     zero_bubble=p.pipeline_schedule == "zb-h1")
            gathered, scattered = full_sharding_traffic(full_sharding_units(model, dp), actions,
                                                        pipelined=pp > 1)
            got["dp.all_gather"] += gathered * param_bytes
            got["dp.reduce_scatter"] += scattered * 4       # reduced in fp32
            got["dp.all_reduce"] += 8 + 4                    # gradient norm, loss
        elif dp > 1:
            buckets = [n for _, n, _ in bucket_layout(params, bucket_elements(p, dp), dp)]
            if p.use_distributed_optimizer:
                got["dp.reduce_scatter"] += sum(buckets) * grad_bytes
                got["dp.all_gather"] += sum(buckets) * param_bytes
                got["dp.all_reduce"] += 8                    # the gradient norm's square
            else:
                got["dp.all_reduce"] += sum(buckets) * grad_bytes
            got["dp.all_reduce"] += 4                        # the loss
        if pp > 1:
            message = _boundary_bytes(cfg, sixteen)
            for chunk in range(layout.chunks):
                position = chunk * pp + stage                # the chunk's place in the model
                if position < pp * layout.chunks - 1:        # sends forward, gets gradients
                    got["pp.send"] += micro * message
                    got["pp.recv"] += micro * message
                if position > 0:                             # gets activations, sends back
                    got["pp.recv"] += micro * message
                    got["pp.send"] += micro * message
            got["pp.all_reduce"] += 8
            got["pp.broadcast"] += 4
        if nan_check(precision) and tp * pp * dp > 1:
            got["world.all_reduce"] += 4
        if tp > 1:
            got.update(_tensor_parallel_bytes(cfg, layout, stage, micro, sixteen))
            if full:   # each TP-partial gradient's shard (DP rank 0's), fp32
                got["tp.all_reduce"] += sum(shard_rows(q, dp) for q in params
                                            if has_partial_grad(q)) * 4 + 8
            else:
                partial = [n for _, n, is_partial in
                           bucket_layout(params, bucket_elements(p, dp), dp) if is_partial]
                got["tp.all_reduce"] += sum(partial) * grad_bytes + 8  # + the gradient norm
        out.append(dict(got))
    return out


def full_sharding_traffic(units: list[tuple[int, list[int]]], actions: list,
                          pipelined: bool) -> tuple[int, int]:
    """(elements all-gathered, elements reduce-scattered) over dp in one step by FSDP2's
    units (`memory.full_sharding_units`: per chunk, the root's and each block's padded
    elements) for this stage's schedule `actions`. A forward gathers each of the chunk's
    units that is sharded; blocks shard again after forward unless `pipelined` (the root
    never does); a backward gathers what is sharded, reduce-scatters every unit's gradient
    and shards them all again. Counts FSDP2's behaviour as measured on CPU; not modelled:
    under full recomputation without pipelining, FSDP2 gathers and reduce-scatters a part of
    the root once more per micro-batch (the recomputed region's own backward ends its
    bookkeeping early; the gradients are still right)."""
    sharded = {(c, u): True for c, (_, blocks) in enumerate(units)
               for u in range(len(blocks) + 1)}            # u = 0: the root
    gathered = scattered = 0
    for a in actions:
        root, blocks = units[a.chunk]
        sizes = [root, *blocks]
        for u, size in enumerate(sizes):
            if sharded[(a.chunk, u)]:
                gathered += size
                sharded[(a.chunk, u)] = False
        if a.kind == "F":
            if not pipelined:
                for u in range(1, len(sizes)):
                    sharded[(a.chunk, u)] = True
        else:
            scattered += sum(sizes)
            for u in range(len(sizes)):
                sharded[(a.chunk, u)] = True
    return gathered, scattered


def _tensor_parallel_bytes(cfg: Config, layout, stage: int, micro: int, sixteen: bool
                           ) -> Counter:
    """The TP collectives of one stage's micro-batches (blocks, embedding scatter, gather
    before the head, MAP head); the per-step partial bucket and norm are added apart."""
    p, m = cfg.parallel, cfg.model
    if m.patch_merge_layers or m.feature_layers or m.dropped_before_pooling:
        raise NotImplementedError("the planner does not count TP messages of merged grids, "
                                  "feature maps, registers or a distillation token yet")
    t, b, h = p.tensor_model_parallel_size, cfg.training.micro_batch_size, m.hidden_size
    elem = 2 if sixteen else 4
    s = m.seq_length
    sp = p.sequence_parallel
    per_block = 1 if m.block_type == "parallel" else 2
    message = (-(-s // t) * t if sp else s) * b * h * elem
    got: Counter = Counter()
    for chunk in range(layout.chunks):
        layers = layout.chunk_layers(stage, chunk)
        executions = 2 * len(layers) + _recomputed_blocks(cfg, layers)   # fwd, bwd, again
        if sp:
            got["tp.all_gather"] += micro * per_block * executions * message
            got["tp.reduce_scatter"] += micro * per_block * executions * message
            if p.sequence_parallel_regather:
                got["tp.all_gather"] += micro * per_block * len(layers) * message
        else:
            got["tp.all_reduce"] += micro * per_block * executions * message
        position = chunk * layout.stages + stage
        if sp and position == 0:                              # the embedding's scatter
            got["tp.all_gather"] += micro * message
        if position == layout.stages * layout.chunks - 1:     # the head
            if sp:
                got["tp.all_gather"] += micro * message       # the gather before it
            if m.pooling == "map":
                got["tp.all_reduce"] += micro * (2 * b * h + h + s * b * h + b * h) * elem
    return got


def _recomputed_blocks(cfg: Config, layers: range) -> int:
    """Blocks of a chunk whose forward runs again in backward (full recomputation)."""
    p = cfg.parallel
    if p.recompute_granularity != "full":
        return 0
    if p.recompute_method == "block":
        return min(p.recompute_num_layers or 0, len(layers))
    return len(layers)


def _boundary_bytes(cfg: Config, sixteen: bool) -> int:
    """One micro-batch's activation between two pipeline chunks: [s, b, h] (this rank's
    sequence shard under SP, the sequence padded to a multiple of t)."""
    p, m = cfg.parallel, cfg.model
    if m.patch_merge_layers or m.feature_layers:
        raise NotImplementedError("the planner does not count pipeline messages of merged "
                                  "grids or carried feature maps yet")
    tokens, t = m.seq_length, p.tensor_model_parallel_size
    if p.sequence_parallel and t > 1:
        tokens = -(-tokens // t)
    return tokens * cfg.training.micro_batch_size * m.hidden_size * (2 if sixteen else 4)
