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
    pp.send / pp.recv   one activation forward and its gradient back per micro-batch across
                        each boundary between consecutive chunks: [s (/ t under SP, padded),
                        b, h] in the activation dtype
    pp.all_reduce       the gradient norm's square (fp64 [1])
    pp.broadcast        the step's loss from the last stage (fp32 [1])
    world.all_reduce    the NaN / inf flag (fp32 [1]) when the check is on

Only groups of more than one rank communicate. Not counted yet: the TP group's collectives
(inside the blocks and heads, the TP-partial gradient bucket, the gradient norm) and the
bytes of carried feature maps between stages.
"""

from __future__ import annotations

from collections import Counter

from megavit.config import Config
from megavit.parallel.data_parallel import bucket_layout
from megavit.planner.memory import stage_on_meta
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
        params = list(stage_on_meta(cfg.model, layout, stage, tp, 0, p).parameters())
        if dp > 1:
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
        out.append(dict(got))
    return out


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
