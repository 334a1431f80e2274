"""Predicted step time of a training layout on a GPU spec: an analytic model.

    shape = vit_shape(cfg.model)                  # or gpt_shape(layers, hidden, heads, s, V)
    layout = PlanLayout(tp=8, pp=4, dp=8, micro_batch=1, global_batch=256, ...)
    t = predict_step(shape, layout, load_gpu("h100-sxm"), gpus_per_node=8)
    t.step_s, t.parts                             # seconds, and where they go

The model, per pipeline stage and micro-batch, on one TP rank:

    matmuls        each GEMM [M, K] x [K, N] takes 2MNK / (peak x e(n)) with n = min(M, N,
                   K) and e(n) = gemm_max x n / (n + gemm_half): big GEMMs approach
                   gemm_max of the datasheet peak, thin ones (a small TP shard, a short
                   sequence) fall off; attention's QK^T and AV are GEMMs of n = the head
                   width. Backward is twice the forward's matmuls.
    memory-bound   norms, activations, residuals, dropout, softmax outside the fused core:
                   `elementwise` bytes per [token, width] element per block forward, over
                   the HBM bandwidth; backward twice
    recomputation  full: every recomputed block's forward again in backward; selective:
                   the attention core's again
    TP             every block's collectives (communication.py's counts: one each way for a
                   parallel block, two for a sequential one, again when recomputed), by an
                   alpha-beta ring on NVLink when the TP group fits a node, else the
                   network: all-reduce 2(t-1)/t bytes x beta + 2(t-1) alpha, all-gather and
                   reduce-scatter half of that; not overlapped with compute (megavit does
                   not overlap them), or with `overlap_tp_comm` (Megatron's
                   --tp-comm-overlap) only what outlasts the block's GEMMs
    pipeline       the stages' forward / backward times (the slowest stage's, with one p2p
                   message per chunk boundary each way, on the network when a stage spans
                   whole nodes): (m + (P - 1) / v)(F + B), the makespan the schedule
                   simulator of megavit/parallel/schedules.py gives 1F1B and interleaved
                   schedules of equal stages
    DP             the gradient reduction (ring all-reduce of the stage's gradients, or
                   reduce-scatter + the parameters' all-gather with the distributed
                   optimizer): with overlap, only what outlasts the last micro-batch's
                   backward is exposed; the all-gather after the optimizer is exposed, or
                   with `overlap_param_gather` only what outlasts a stage's forward
    full sharding  (FSDP2 / ZeRO-3, --data-parallel-sharding-strategy full) one unit per
                   block: its parameters all-gathered before its forward and, without
                   pipelining, again before its backward in every micro-batch (resharded
                   after forward; under PP kept from forward to backward), its
                   gradients reduce-scattered (fp32) after its backward in every
                   micro-batch; each prefetched under the previous block's compute, so
                   only what outlasts it is exposed
    optimizer      AdamW's reads and writes of parameters, gradients, masters and moments
                   over the HBM bandwidth

`Efficiency` (hardware.py) holds the three fitted constants, per GPU in its spec file
(docs/planner.md: how they were fitted and on which published runs they were checked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megavit.config import ModelConfig
from megavit.planner.hardware import Efficiency, GpuSpec


@dataclass(frozen=True)
class TransformerShape:
    """What the time model needs of a model: `blocks` of width `hidden` over `seq` tokens
    per sample, and the extra GEMM of the head ([tokens, hidden] x [hidden, head_out]
    per sample: a GPT's vocabulary over every token, a ViT's classes over one)."""

    kind: str                      # "vit" or "gpt"
    layers: int
    hidden: int
    heads: int
    ffn: int
    seq: int
    block_type: str = "sequential"
    head_out: int = 0              # a GPT's vocabulary, a ViT's classes
    head_tokens: int = 1           # a GPT's seq, a ViT's 1 (pooled)
    parameters: int = 0            # whole model (for the optimizer and the DP volume)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def vit_shape(model: ModelConfig) -> TransformerShape:
    h, f, L = model.hidden_size, model.ffn_hidden_size, model.num_layers
    blocks = L * (h * (3 * h + f) + (h + f) * h)
    return TransformerShape("vit", L, h, model.num_attention_heads, f, model.seq_length,
                            model.block_type, model.num_classes or 0, 1,
                            blocks + (model.num_classes or 0) * h)


def gpt_shape(layers: int, hidden: int, heads: int, seq: int, vocab: int,
              ffn: int | None = None) -> TransformerShape:
    """A GPT decoder (Megatron's: sequential blocks, MLP 4h, vocabulary head tied to the
    embedding): 12 l h^2 + V h parameters (biases and norms left out)."""
    f = ffn or 4 * hidden
    return TransformerShape("gpt", layers, hidden, heads, f, seq, "sequential", vocab, seq,
                            layers * (4 * hidden * hidden + 2 * hidden * f) + vocab * hidden)


@dataclass(frozen=True)
class PlanLayout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    chunks: int = 1                  # virtual stages per pipeline stage
    sequence_parallel: bool = False
    recompute: str = "none"          # "none", "selective" or "full"
    micro_batch: int = 1
    global_batch: int = 1
    distributed_optimizer: bool = False
    full_sharding: bool = False      # FSDP2 / ZeRO-3 over DP (--data-parallel-sharding-strategy full)
    overlap_grad_reduce: bool = True
    bytes_per_element: int = 2       # activations and parameters (bf16 / fp16: 2)
    # Megatron's --tp-comm-overlap and --overlap-param-gather (megavit has neither; the
    # published H100 runs used both): TP collectives hidden under the block's GEMMs, the
    # ZeRO-1 parameter all-gather under the next step's first forward
    overlap_tp_comm: bool = False
    overlap_param_gather: bool = False

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass
class StepPrediction:
    step_s: float
    parts: dict[str, float] = field(default_factory=dict)   # seconds, by where they go


def model_flops(shape: TransformerShape, samples: int, recompute: str = "none") -> float:
    """Matmul FLOPs of a training step on `samples` (3x the forward; + 1 forward with full
    recomputation, as Narayanan et al.'s eq. 3 counts them for a GPT)."""
    s, h, f = shape.seq, shape.hidden, shape.ffn
    per_block = 2 * s * h * (3 * h + f) + 2 * s * (h + f) * h + 4 * s * s * h
    head = 2 * shape.head_tokens * h * shape.head_out
    forward = samples * (shape.layers * per_block + head)
    extra = samples * shape.layers * per_block if recompute == "full" else 0
    return 3 * forward + extra


def element_bytes(layout: "PlanLayout", precision: str) -> int:
    """Bytes per activation / parameter element: 4 in fp32 (whatever the layout says),
    else the layout's (2 for bf16 / fp16)."""
    return 4 if precision == "fp32" else layout.bytes_per_element


def _gemm(m: float, n: float, k: float, peak: float, eff: Efficiency) -> float:
    smallest = min(m, n, k)
    return 2 * m * n * k / (peak * eff.gemm_max * smallest / (smallest + eff.gemm_half))


def _ring(kind: str, nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """Seconds of a ring collective of `nbytes` (the whole tensor) over `ranks`."""
    if ranks <= 1:
        return 0.0
    steps = 2 * (ranks - 1) if kind == "all_reduce" else ranks - 1
    return steps * alpha + steps / ranks * nbytes * beta


def block_times(shape: TransformerShape, layout: PlanLayout, gpu: GpuSpec,
                gpus_per_node: int, eff: Efficiency, precision: str = "bf16"
                ) -> tuple[float, float, float]:
    """(forward, backward, TP communication each way) seconds of one block on one
    micro-batch on one TP rank; the backward includes recomputation."""
    t, b, s, h, f = layout.tp, layout.micro_batch, shape.seq, shape.hidden, shape.ffn
    peak, p = gpu.peak_flops(precision), element_bytes(layout, precision)
    T = s * b
    if shape.block_type == "parallel":
        gemms = _gemm(T, (3 * h + f) / t, h, peak, eff) + _gemm(T, h, (h + f) / t, peak, eff)
    else:
        gemms = (_gemm(T, 3 * h / t, h, peak, eff) + _gemm(T, h, h / t, peak, eff)
                 + _gemm(T, f / t, h, peak, eff) + _gemm(T, h, f / t, peak, eff))
    heads = b * shape.heads / t
    attention = heads * 2 * _gemm(s, s, shape.head_dim, peak, eff)     # QK^T and AV
    elementwise = eff.elementwise * T * (h + f / t) * p / gpu.memory_bandwidth
    forward = gemms + attention + elementwise
    # TP: per direction, one collective (two for a sequential block) of [s, b, h]
    alpha, beta = gpu.link(inter_node=t > gpus_per_node)
    per_block = 1 if shape.block_type == "parallel" else 2
    message = (-(-s // t) * t if layout.sequence_parallel else s) * b * h * p
    if layout.sequence_parallel:
        comm = per_block * (_ring("all_gather", message, t, alpha, beta)
                            + _ring("reduce_scatter", message, t, alpha, beta))
    else:
        comm = per_block * _ring("all_reduce", message, t, alpha, beta)
    if layout.overlap_tp_comm:
        comm = max(0.0, comm - gemms)
    backward = 2 * forward
    if layout.recompute == "full":
        backward += forward + comm
    elif layout.recompute == "selective":
        backward += attention
    return forward, backward, comm


def fsdp_unit(shape: TransformerShape, tp: int) -> float:
    """Parameters of one full-sharding unit (a block) on one TP rank, before sharding over
    DP: what is gathered before its forward and backward."""
    return shape.parameters / (tp * shape.layers)


def pipeline_makespan(micro_batches: int, stages: int, chunks: int, forward: float,
                      backward: float) -> float:
    """Seconds of m micro-batches through P equal stages of `forward` / `backward` seconds
    each (a stage's whole part; v chunks): (m + (P - 1) / v) (F + B), the 1F1B or
    interleaved makespan that `megavit.parallel.schedules.simulate` gives for equal stages
    (a test checks it)."""
    return (micro_batches + (stages - 1) / chunks) * (forward + backward)


def predict_step(shape: TransformerShape, layout: PlanLayout, gpu: GpuSpec,
                 gpus_per_node: int = 8, eff: Efficiency | None = None,
                 precision: str = "bf16") -> StepPrediction:
    """The predicted seconds of one training step (see the module docstring); `eff`
    defaults to the GPU spec's fitted constants."""
    eff = eff or gpu.efficiency or Efficiency()
    t, pp, dp, v = layout.tp, layout.pp, layout.dp, layout.chunks
    m = layout.micro_batches
    if m < 1 or layout.global_batch % (layout.micro_batch * dp):
        raise ValueError(f"global batch {layout.global_batch} is not a multiple of micro "
                         f"batch {layout.micro_batch} x DP {dp}")
    fwd, bwd, comm = block_times(shape, layout, gpu, gpus_per_node, eff, precision)
    layers_per_stage = -(-shape.layers // pp)
    peak, p = gpu.peak_flops(precision), element_bytes(layout, precision)
    b = layout.micro_batch
    head = _gemm(shape.head_tokens * b, shape.head_out / t, shape.hidden, peak, eff) \
        if shape.head_out else 0.0
    # the pipeline: the slowest stage (the last: its blocks and the head), p2p per chunk
    stage_fwd = layers_per_stage * (fwd + comm) + head
    stage_bwd = layers_per_stage * (bwd + comm) + 2 * head
    p2p = 0.0
    if pp > 1:
        alpha, beta = gpu.link(inter_node=t * dp >= gpus_per_node)
        tokens = -(-shape.seq // t) if layout.sequence_parallel else shape.seq
        p2p = v * (alpha + tokens * b * shape.hidden * p * beta)
    fsdp = 0.0
    if layout.full_sharding and dp > 1:
        # one unit per block: its parameters gathered before its forward (and, without PP,
        # before its backward), its gradients reduce-scattered after its backward in every
        # micro-batch (FSDP2's default); each prefetched under the block before, so only
        # what outlasts a block's compute shows
        alpha, beta = gpu.link(inter_node=t * dp > gpus_per_node)
        unit = fsdp_unit(shape, t)
        gather = _ring("all_gather", unit * p, dp, alpha, beta)
        scatter = _ring("reduce_scatter", unit * 4, dp, alpha, beta)
        # under PP the units stay gathered from forward to backward (megavit's FSDP2
        # units: no reshard after forward; communication.full_sharding_traffic counts it)
        again = 0.0 if pp > 1 else gather
        wait_fwd = layers_per_stage * max(0.0, gather - fwd - comm)
        wait_bwd = layers_per_stage * max(0.0, again + scatter - bwd - comm)
        stage_fwd += wait_fwd
        stage_bwd += wait_bwd
        fsdp = m * (wait_fwd + wait_bwd)
    pipeline = pipeline_makespan(m, pp, v, stage_fwd + p2p, stage_bwd + p2p)
    # DP: the stage's gradients (fp32) reduced, overlapped with the last backward
    params_per_rank = shape.parameters / (t * pp)
    alpha, beta = gpu.link(inter_node=t * dp > gpus_per_node)
    exposed = gather = 0.0
    if dp > 1 and not layout.full_sharding:     # (full sharding's is in the stages)
        grads = params_per_rank * 4
        if layout.distributed_optimizer:
            reduce = _ring("reduce_scatter", grads, dp, alpha, beta)
            gather = _ring("all_gather", params_per_rank * p, dp, alpha, beta)
            if layout.overlap_param_gather:
                gather = max(0.0, gather - stage_fwd)
        else:
            reduce = _ring("all_reduce", grads, dp, alpha, beta)
        window = stage_bwd / v if layout.overlap_grad_reduce else 0.0
        exposed = max(0.0, reduce - window)
    shards = dp if layout.distributed_optimizer or layout.full_sharding else 1
    # AdamW: read/write params (p), read grads (4), read/write masters (4) and moments (8);
    # with full sharding all of them are shards
    optimizer = params_per_rank * ((2 * p + 4) / (dp if layout.full_sharding else 1)
                                   + (2 * 4 + 2 * 8) / shards) / gpu.memory_bandwidth
    parts = {"pipeline": pipeline, "dp_exposed": exposed, "param_gather": gather,
             "optimizer": optimizer,
             "bubble": pipeline - m * (stage_fwd + stage_bwd + 2 * p2p),
             "tp_comm": m * 2 * layers_per_stage * comm, "fsdp_exposed": fsdp}
    return StepPrediction(pipeline + exposed + gather + optimizer, parts)
