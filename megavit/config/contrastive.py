"""Flags of `python -m megavit.pretrain_contrastive`: the image tower's model, parallel,
training, precision, logging and checkpoint flags of `megavit.pretrain`, plus the text tower
(`TextConfig`, `--text-preset`) and the contrastive setup below. The image tower is built
without a classifier; its data flags are replaced by `--image-text-data`.

    cfg = parse_contrastive_args(["--preset", "vit-debug", "--text-preset", "text-debug"])
    validate_contrastive(cfg, world_size=2)
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Sequence

from megavit.config.fields import ConfigError, opt, section_from_dict
from megavit.config.flags import build_parser, config_from_sections, parse_sections
from megavit.config.model import ModelConfig, TextConfig
from megavit.config.parallel import ParallelConfig
from megavit.config.presets import TEXT_PRESETS
from megavit.config.run import (CheckpointConfig, Config, LoggingConfig, PrecisionConfig,
                                TrainingConfig)
from megavit.config.validation import validate

@dataclass
class ContrastiveConfig:
    """Contrastive image-text training: the loss, the data, LiT."""

    loss: str = field(
        default="siglip",
        metadata=opt("'clip': softmax InfoNCE both ways over the global batch (features "
                     "all-gathered over DP with gradients); 'siglip': pairwise sigmoid, text "
                     "blocks passed around the DP ring (per-rank memory flat in DP).",
                     choices=("clip", "siglip")))
    siglip_chunks: int | None = field(
        default=None,
        metadata=opt("SigLIP at DP > 1: each rank's texts travel the ring in this many row "
                     "chunks, so a rank holds [n, n/k] logits and a few [n/k, d] chunks "
                     "(default 8); more chunks, less memory and more messages."))
    embed_dim: int | None = field(
        default=None, metadata=opt("Width of the shared embedding space; default: the text "
                                   "tower's width (the image tower's with "
                                   "--no-image-projection)."))
    image_projection: bool = field(
        default=True,
        metadata=opt("Project the image features into the embedding space; "
                     "--no-image-projection: the image embedding is the image tower's pooled "
                     "features themselves (SigLIP), so --embed-dim is the image width "
                     "(--hidden-size)."))
    lock_image_tower: bool = field(
        default=False,
        metadata=opt("LiT: load the image tower from --image-checkpoint and keep it fixed "
                     "(forward only, no gradients, no optimizer state)."))
    image_checkpoint: str | None = field(
        default=None,
        metadata=opt("A megavit.pretrain --save directory (its latest checkpoint) whose image "
                     "model initialises the image tower; its classifier is dropped."))
    contrastive_queue_size: int = field(
        default=0,
        metadata=opt("Momentum-contrast queue (--loss clip): this many past global batches' "
                     "image and text embeddings serve as extra negatives (0: off; not saved "
                     "in checkpoints, it refills after a restart)."))
    image_text_data: str = field(
        default="digits",
        metadata=opt("'digits' / 'mnist5k': the embedded real digits with captions from "
                     "prompt templates; 'csv': --image-text-path FILE.csv|.tsv of (image "
                     "path, caption); 'shards': --image-text-path 'DIR/{000..009}.tar' "
                     "webdataset shards.", choices=("digits", "mnist5k", "csv", "shards")))
    image_text_path: str | None = field(
        default=None, metadata=opt("The CSV/TSV file or shard pattern of --image-text-data."))
    fatal_data_errors: bool = field(
        default=False,
        metadata=opt("Stop at the first unreadable sample instead of counting, skipping and "
                     "warning."))
    num_workers: int = field(
        default=2,
        metadata=opt("Loader processes reading and tokenizing CSV / shard samples ahead of "
                     "training (the embedded digits are in memory and need none)."))
    tokenizer_model: str | None = field(
        default=None,
        metadata=opt("A sentencepiece .model file (tools/train_tokenizer.py makes one); "
                     "default for the embedded digits: one trained on their captions at "
                     "start-up (a fraction of a second)."))
    zero_shot_transfer: str | None = field(
        default=None,
        metadata=opt("Also report zero-shot accuracy on this embedded set the model never "
                     "trained on ('mnist5k' or 'digits').", choices=("digits", "mnist5k")))


@dataclass
class SimilarityDistillationConfig:
    """Two-tower distillation (open_clip's rule): a frozen two-tower teacher scores the
    same global batch and the student's image-text similarities learn its distribution
    beside the contrastive loss."""

    teacher_checkpoint: str | None = field(
        default=None,
        metadata=opt("A frozen two-tower teacher: a megavit.pretrain_contrastive checkpoint "
                     "(a --save directory or its iter_N/, any saved layout, its own tokenizer "
                     "beside it or --teacher-tokenizer-model; one imported with "
                     "tools/import_hf.py). It runs forward only "
                     "on the first pipeline stage at the job's tensor-parallel size on the "
                     "student's images (resized / renormalised to its preprocessing) and "
                     "captions (its own tokenizer). Adds --distill-similarity-weight x the "
                     "similarity term to the loss. Default: no teacher."))
    teacher_tokenizer_model: str | None = field(
        default=None,
        metadata=opt("The teacher's sentencepiece .model file, when its checkpoint has "
                     "none beside the weights (a CLIP imported with tools/import_hf.py); "
                     "its vocabulary size must be the teacher's."))
    distill_similarity_weight: float = field(
        default=1.0,
        metadata=opt("Weight of the similarity term: the mean of the image-to-text and "
                     "text-to-image cross-entropies between the softmax of the teacher's "
                     "scaled similarities and the student's, over the global batch."))


@dataclass
class ContrastiveRunConfig:
    """Everything `megavit.pretrain_contrastive` is configured by."""

    base: Config                       # image model (no classifier), parallel, training, ...
    text: TextConfig
    contrastive: ContrastiveConfig
    text_preset: str | None = None
    distillation: SimilarityDistillationConfig = field(
        default_factory=SimilarityDistillationConfig)

    @property
    def embed_dim(self) -> int:
        if self.contrastive.embed_dim:
            return self.contrastive.embed_dim
        if not self.contrastive.image_projection:
            return self.base.model.hidden_size
        return self.text.blocks.hidden_size

    @property
    def model(self) -> ModelConfig:
        """The image tower's config (as `Config.model`, for the checkpoint code)."""
        return self.base.model

    @property
    def precision(self) -> PrecisionConfig:
        return self.base.precision


SECTIONS: tuple[tuple[str, type], ...] = (
    ("model", ModelConfig),
    ("text", TextConfig),
    ("contrastive", ContrastiveConfig),
    ("distillation", SimilarityDistillationConfig),
    ("parallel", ParallelConfig),
    ("training", TrainingConfig),
    ("precision", PrecisionConfig),
    ("logging", LoggingConfig),
    ("checkpoint", CheckpointConfig),
)
PROG = "python -m megavit.pretrain_contrastive"


def contrastive_parser() -> argparse.ArgumentParser:
    return build_parser(PROG, SECTIONS, "Train an image tower and a text tower into one "
                        "embedding space (CLIP, SigLIP, LiT) with tensor and data parallelism.")



# Image-tower attention flags that a user may try with the text prefix: the text tower has
# none of them (its attention is full, causal or not), so they are refused by name.
IMAGE_ONLY_ATTENTION_FLAGS = ("attention-type", "attention-type-per-layer", "window-size",
                              "window-shift", "global-attention-layers",
                              "position-embedding-type")


def parse_contrastive_args(argv: Sequence[str] | None = None) -> ContrastiveRunConfig:
    """Flags -> ContrastiveRunConfig (presets first, explicit flags on top); the image
    model has no classifier."""
    refused = {f"--{no}text-{flag}" for flag in IMAGE_ONLY_ATTENTION_FLAGS for no in ("", "no-")}
    for arg in (sys.argv[1:] if argv is None else argv):
        name = arg.split("=", 1)[0]
        if name in refused:
            raise ConfigError(f"{name}: the text tower takes only full attention (causal with "
                              "--text-causal, bidirectional with --no-text-causal) and its "
                              "learned 1-D positions; window, local-global and linear "
                              "attention and 2-D positions are image-tower flags "
                              "(--attention-type, --position-embedding-type)")
    sections, presets = parse_sections(contrastive_parser(), SECTIONS, argv)
    sections["model"].setdefault("num_classes", 0)
    base = config_from_sections(sections, presets["preset"])
    text_preset = presets["text_preset"]
    text = section_from_dict(TextConfig, {**(TEXT_PRESETS[text_preset] if text_preset else {}),
                                          **sections["text"]})
    return ContrastiveRunConfig(base, text, ContrastiveConfig(**sections["contrastive"]),
                                text_preset,
                                SimilarityDistillationConfig(**sections["distillation"]))


def validate_contrastive(cfg: ContrastiveRunConfig, world_size: int = 1) -> None:
    """The image tower's checks of `validate`, then the text tower's and the contrastive
    setup's; ConfigError naming every problem's flag."""
    validate(cfg.base, world_size)
    problems = _check_image_tower(cfg.base.model) + _check_text_sizes(cfg.text)
    if problems:  # the checks below divide by these sizes
        raise ConfigError("; ".join(problems))
    problems = (_check_text(cfg.text, cfg.base.parallel.tensor_model_parallel_size)
                + _check_contrastive(cfg) + _check_two_tower_layout(cfg.base, world_size))
    if problems:
        raise ConfigError("the configuration has problems:\n  - " + "\n  - ".join(problems)
                          if len(problems) > 1 else problems[0])


def _check_image_tower(m: ModelConfig) -> list[str]:
    problems = []
    if m.num_classes:
        problems.append("--num-classes: the image tower of a two-tower model has no "
                        "classifier; leave it unset")
    if m.feature_layers:
        problems.append(f"--feature-layers {m.feature_layers}: the image tower pools the last "
                        "block only; feature layers feed a dense head (python -m "
                        "megavit.segment --neck fpn)")
    return problems


def _check_text_sizes(text: TextConfig) -> list[str]:
    blocks = text.blocks
    problems = [f"{flag} must be at least 1 (got {value})" for flag, value in {
        "--text-num-layers": blocks.num_layers,
        "--text-hidden-size": blocks.hidden_size,
        "--text-num-attention-heads": blocks.num_attention_heads,
        "--text-ffn-hidden-size": blocks.ffn_hidden_size,
        "--make-vocab-size-divisible-by": text.make_vocab_size_divisible_by}.items()
        if value < 1]
    if text.context_length < 2:
        problems.append(f"--context-length must be at least 2 (a token and EOS; got "
                        f"{text.context_length})")
    return problems


def _check_text(text: TextConfig, tp: int) -> list[str]:
    """What the text sizes must divide, and the text flags that need or exclude others."""
    blocks, problems = text.blocks, []
    if (blocks.attention_type != "full" or blocks.attention_pattern() or blocks.window_shift
            or blocks.global_attention_layers.strip()):
        problems.append("the text tower takes only full attention (causal or not): its "
                        f"blocks have attention_type {blocks.attention_type!r}, "
                        f"attention_type_per_layer {blocks.attention_type_per_layer!r}, "
                        f"window_shift {blocks.window_shift}, global_attention_layers "
                        f"{blocks.global_attention_layers!r} (a text preset or a config "
                        "built in Python); window, local-global and linear attention are for "
                        "the image tower")
    if blocks.hidden_size % blocks.num_attention_heads:
        problems.append(f"--text-hidden-size {blocks.hidden_size} is not divisible by "
                        f"--text-num-attention-heads {blocks.num_attention_heads}")
    if blocks.num_attention_heads % tp or blocks.ffn_hidden_size % tp:
        problems.append(f"--tensor-model-parallel-size {tp} must divide --text-num-attention-"
                        f"heads {blocks.num_attention_heads} and --text-ffn-hidden-size "
                        f"{blocks.ffn_hidden_size}")
    if text.make_vocab_size_divisible_by % tp:
        problems.append(f"--tensor-model-parallel-size {tp} must divide "
                        f"--make-vocab-size-divisible-by {text.make_vocab_size_divisible_by} "
                        "(the padded vocabulary is split over TP)")
    if text.text_causal and text.text_pooling not in ("eos", "last"):
        problems.append(f"--text-pooling {text.text_pooling} with causal attention sees only "
                        "the caption's start; use --text-pooling eos or last, or "
                        "--no-text-causal")
    if text.text_causal and not text.text_mask_padding:
        problems.append("--no-text-mask-padding applies to bidirectional text attention; add "
                        "--no-text-causal (causal attention never lets a token see later "
                        "padding)")
    if text.text_pad_with_eos and not text.text_causal and text.text_mask_padding:
        problems.append("--text-pad-with-eos: padding has EOS's id, so --text-mask-padding "
                        "would hide each caption's EOS too; add --no-text-mask-padding")
    if blocks.norm_epsilon <= 0:
        problems.append(f"--text-norm-epsilon must be positive (got {blocks.norm_epsilon})")
    return problems


def _check_contrastive(cfg: ContrastiveRunConfig) -> list[str]:
    """The embedding, the loss, LiT and the image-text data."""
    contrastive, hidden = cfg.contrastive, cfg.base.model.hidden_size
    problems = []
    if contrastive.embed_dim is not None and contrastive.embed_dim < 1:
        problems.append(f"--embed-dim must be at least 1 (got {contrastive.embed_dim})")
    elif not contrastive.image_projection and cfg.embed_dim != hidden:
        problems.append(f"--no-image-projection: the image features are the embeddings, so "
                        f"--embed-dim {cfg.embed_dim} must equal --hidden-size "
                        f"{hidden} (or be left unset)")
    if contrastive.siglip_chunks is not None and contrastive.siglip_chunks < 1:
        problems.append(f"--siglip-chunks must be at least 1 (got {contrastive.siglip_chunks})")
    if contrastive.num_workers < 0:
        problems.append(f"--num-workers must be 0 or more (got {contrastive.num_workers})")
    if contrastive.contrastive_queue_size < 0:
        problems.append("--contrastive-queue-size must be 0 or more")
    elif contrastive.contrastive_queue_size and contrastive.loss != "clip":
        problems.append("--contrastive-queue-size adds negatives to the softmax of --loss clip; "
                        "SigLIP's pairwise loss has no queue here")
    if contrastive.lock_image_tower and not contrastive.image_checkpoint:
        problems.append("--lock-image-tower needs --image-checkpoint DIR (a locked random "
                        "tower learns nothing)")
    if contrastive.image_checkpoint and not os.path.isdir(contrastive.image_checkpoint):
        problems.append(f"--image-checkpoint {contrastive.image_checkpoint}: no such directory")
    distill = cfg.distillation
    if distill.teacher_checkpoint and not os.path.isdir(distill.teacher_checkpoint):
        problems.append(f"--teacher-checkpoint {distill.teacher_checkpoint}: no such directory")
    if distill.distill_similarity_weight < 0:
        problems.append(f"--distill-similarity-weight {distill.distill_similarity_weight}: "
                        "must be 0 or more")
    return problems + _check_image_text_data(contrastive)


def _check_image_text_data(c: ContrastiveConfig) -> list[str]:
    problems = []
    if c.image_text_data in ("csv", "shards") and not c.image_text_path:
        problems.append(f"--image-text-data {c.image_text_data} needs --image-text-path")
    if c.image_text_path and c.image_text_data not in ("csv", "shards"):
        problems.append("--image-text-path is read by --image-text-data csv or shards only")
    if c.image_text_data in ("csv", "shards") and not c.tokenizer_model:
        problems.append(f"--image-text-data {c.image_text_data} needs --tokenizer-model "
                        "(tools/train_tokenizer.py trains one from your captions)")
    return problems


def _check_two_tower_layout(base: Config, world_size: int) -> list[str]:
    """What megavit.pretrain accepts but the two-tower pipeline and loss cannot run."""
    parallel, training = base.parallel, base.training
    problems = []
    if parallel.num_layers_per_virtual_pipeline_stage is not None:
        problems.append("--num-layers-per-virtual-pipeline-stage: the two-tower pipeline "
                        "runs one micro-batch per step, so virtual stages cannot shrink its "
                        "bubble; leave it unset")
    model_parallel = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    dp = world_size // model_parallel if world_size else 1
    if training.global_batch_size != training.micro_batch_size * dp:
        problems.append(f"--global-batch-size {training.global_batch_size} must equal "
                        f"--micro-batch-size {training.micro_batch_size} x data-parallel size "
                        f"{dp}: "
                        "a contrastive loss needs every negative of the batch at once, so "
                        "there is no gradient accumulation")
    if training.layer_decay not in (None, 1.0) or training.freeze_backbone:
        problems.append("--layer-decay and --freeze-backbone fine-tune megavit.pretrain's "
                        "classifier; a two-tower run locks its image tower with "
                        "--lock-image-tower (LiT)")
    if parallel.pipeline_schedule in ("zb-h1", "interleaved"):
        problems.append(f"--pipeline-schedule {parallel.pipeline_schedule}: the two-tower "
                        "pipeline runs one micro-batch per step, with nothing for another "
                        "schedule to overlap; leave it at auto")
    if parallel.data_parallel_sharding_strategy == "full":
        problems.append("--data-parallel-sharding-strategy full: the two-tower model is not "
                        "fully sharded yet; use --use-distributed-optimizer")
    if parallel.recompute_granularity == "auto":
        problems.append("--recompute-granularity auto plans megavit.pretrain's pipeline "
                        "stages; for two towers choose selective or full (with "
                        "--recompute-method and --recompute-num-layers)")
    return problems
