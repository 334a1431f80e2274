"""The layout section: how the world is split over tensor, pipeline and data parallelism, and
what each rank keeps for backward."""

from __future__ import annotations

from dataclasses import dataclass, field

from megavit.config.fields import opt


@dataclass
class ParallelConfig:
    """How the world is split (tensor parallel inside, data parallel outside) and what each
    rank keeps for backward (sequence parallelism, recomputation)."""

    tensor_model_parallel_size: int = field(
        default=1,
        metadata=opt(
            "Tensor-parallel size t: heads and MLP width are split over t ranks "
            "(keep it within a node)."
        ),
    )
    pipeline_model_parallel_size: int = field(
        default=1,
        metadata=opt(
            "Pipeline stages P: the blocks are split over P ranks in a row (the patch "
            "embedding on the first, the head and loss on the last), micro-batches flow "
            "through them with the 1F1B schedule."
        ),
    )
    num_layers_per_virtual_pipeline_stage: int | None = field(
        default=None,
        metadata=opt(
            "Blocks per virtual stage: each stage then holds (layers / P) / this many "
            "non-adjacent pieces of the model and runs the interleaved schedule (bubble "
            "(P-1)/(v*m+P-1) instead of (P-1)/(m+P-1)); micro-batches must be a multiple of P."
        ),
    )
    pipeline_schedule: str = field(
        default="auto",
        metadata=opt(
            "The pipeline schedule: 'auto' (interleaved 1F1B with "
            "--num-layers-per-virtual-pipeline-stage, else 1F1B), '1f1b', 'interleaved', or "
            "'zb-h1' (zero bubble H1: each backward split into the input gradient and the "
            "linear layers' weight gradient, which fills 1F1B's bubble; bubble about a third "
            "of 1F1B's at the same activation memory on stage 0; one chunk per stage).",
            choices=("auto", "1f1b", "interleaved", "zb-h1"),
        ),
    )
    num_layers_in_first_pipeline_stage: int | None = field(
        default=None,
        metadata=opt(
            "Blocks on the first stage (it also runs the patch embedding); default: an "
            "even split. The stages between the first and last share the rest evenly."
        ),
    )
    num_layers_in_last_pipeline_stage: int | None = field(
        default=None,
        metadata=opt("Blocks on the last stage (it also runs the head and the loss)."),
    )
    sequence_parallel: bool = field(
        default=False,
        metadata=opt(
            "Split activations outside the tensor-parallel region (LayerNorms, residuals, "
            "dropout) along the sequence over the TP group: all-gather entering each "
            "column-parallel projection, reduce-scatter leaving each row-parallel one. "
            "Token counts not divisible by TP are padded and masked. No effect at TP=1."
        ),
    )
    sequence_parallel_regather: bool = field(
        default=False,
        metadata=opt(
            "With --sequence-parallel: keep only the sequence shard of each column-parallel "
            "input and all-gather it again in backward (overlapped), instead of keeping the "
            "gathered input. Saves s*b*h activation bytes per projection, costs one more "
            "all-gather in backward (Megatron-LM's behaviour)."
        ),
    )
    recompute_granularity: str | None = field(
        default=None,
        metadata=opt(
            "Recompute activations in backward instead of keeping them: 'selective' (the "
            "attention core of every block: QK-norms and softmax(QK^T)V), 'full' (whole "
            "blocks, see --recompute-method), or 'auto': each pipeline stage recomputes the "
            "fewest whole blocks (method block) that keep its predicted block activations, "
            "times the micro-batches it holds at once, under --activation-memory-budget-gb.",
            choices=("selective", "full", "auto"),
        ),
    )
    recompute_method: str | None = field(
        default=None,
        metadata=opt(
            "With --recompute-granularity full: 'uniform' (chunks of --recompute-num-layers "
            "blocks, only each chunk's input kept) or 'block' (the first "
            "--recompute-num-layers blocks, each on its own; the rest keep everything).",
            choices=("uniform", "block"),
        ),
    )
    recompute_num_layers: int | None = field(
        default=None,
        metadata=opt("Blocks per recomputed chunk (uniform) or blocks recomputed (block)."),
    )
    activation_memory_budget_gb: float | None = field(
        default=None,
        metadata=opt(
            "With --recompute-granularity auto: GB (2^30 bytes) of block activations each "
            "pipeline stage may hold (see docs/activation_memory.md)."
        ),
    )
    use_distributed_optimizer: bool = field(
        default=False,
        metadata=opt(
            "Shard the fp32 master weights and Adam moments over the data-parallel ranks "
            "(ZeRO-1): gradients are reduce-scattered, each rank updates its 1/d, the "
            "parameters are all-gathered. Optimizer state per parameter: 12/d bytes instead "
            "of 12."
        ),
    )
    data_parallel_sharding_strategy: str = field(
        default="optimizer",
        metadata=opt(
            "What is sharded over the data-parallel ranks. 'optimizer': what "
            "--use-distributed-optimizer says (ZeRO-1 with it, nothing without). 'full': "
            "parameters, gradients and optimizer state (ZeRO-3) through PyTorch FSDP2's "
            "fully_shard, one unit per block and one per model chunk, composed with megavit's "
            "tensor and pipeline parallelism; fp32 parameters are the masters, --bf16/--fp16 "
            "compute through FSDP2's mixed-precision policy, gradients reduced in fp32.",
            choices=("optimizer", "full"),
        ),
    )
    overlap_grad_reduce: bool = field(
        default=False,
        metadata=opt(
            "Start each gradient bucket's data-parallel reduction as soon as backward has "
            "produced all its gradients of the step's last micro-batch, instead of after "
            "backward."
        ),
    )
    ddp_bucket_size: int | None = field(
        default=None,
        metadata=opt(
            "Elements per gradient bucket (default: max(40M, 1M x data-parallel size), "
            "Megatron-LM's)."
        ),
    )
    distributed_backend: str = field(
        default="auto",
        metadata=opt(
            "torch.distributed backend: 'auto' (nccl on GPU, gloo on CPU), 'nccl' or 'gloo'.",
            choices=("auto", "nccl", "gloo"),
        ),
    )
    distributed_timeout_minutes: float = field(
        default=10.0,
        metadata=opt("Collective timeout: a dead peer becomes an error after this long."),
    )
    device: str = field(
        default="auto",
        metadata=opt(
            "Where to compute: 'auto' (cuda if available, else cpu), 'cuda' or 'cpu'.",
            choices=("auto", "cuda", "cpu"),
        ),
    )

