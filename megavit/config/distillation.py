"""Flags of `python -m megavit.distill`: `megavit.pretrain`'s flags for the student (model,
parallel, training, precision, data, logging, checkpoint) plus the teacher and the
distillation losses below.

    cfg = parse_distillation_args(["--preset", "vit-debug", "--teacher-checkpoint", "ck"])
    validate_distillation(cfg, world_size=2)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from megavit.config.fields import ConfigError, opt
from megavit.config.flags import SECTIONS as BASE_SECTIONS
from megavit.config.flags import build_parser, config_from_sections, parse_sections
from megavit.config.model import ModelConfig
from megavit.config.run import Config
from megavit.config.validation import validate

DISTILL_LOSSES = ("soft", "hard", "token")


@dataclass
class DistillationConfig:
    """The frozen teacher and what the student learns from it. The teacher runs forward
    only (eval mode, no gradient, no optimizer state) at the job's tensor-parallel size, on
    the ranks of the first pipeline stage (which hold the images), on the same augmented
    images as the student; its logits reach the last stage with the labels."""

    teacher_checkpoint: str | None = field(
        default=None,
        metadata=opt("The teacher: a megavit classifier checkpoint (a --save directory or "
                     "its iter_N/; any saved layout; a timm / transformers model brought in "
                     "with tools/import_hf.py). Its class count must be the student's; its "
                     "image size and normalisation may differ (images are resized and "
                     "renormalised for it). Required."))
    distill_cache: str | None = field(
        default=None,
        metadata=opt("Train from an offline teacher cache (tools/cache_teacher.py wrote it "
                     "for this run's data, seed, batch sizes and image size): the teacher's "
                     "top-K logits are read by image instead of running the teacher "
                     "(--teacher-checkpoint then optional; given, its config must be the "
                     "cache's). Response losses, and pooled features when the cache holds "
                     "them (--distill-pooled-weight)."))
    distill_loss: str = field(
        default="soft",
        metadata=opt("'soft': KL(softmax(teacher/T) || softmax(student/T)) T^2 (Hinton et "
                     "al.); 'hard': cross-entropy against the teacher's top class (DeiT); "
                     "'token': DeiT's distillation token — a second token and classifier in "
                     "the student learn the teacher's top class while the class head learns "
                     "the labels; evaluation averages the two heads' logits.",
                     choices=DISTILL_LOSSES))
    distill_alpha: float = field(
        default=0.5,
        metadata=opt("Weight of the distillation term: loss = (1 - alpha) * the task's loss "
                     "on the labels + alpha * distillation (1.0: the teacher alone)."))
    distill_temperature: float = field(
        default=1.0,
        metadata=opt("Temperature T of --distill-loss soft (both distributions softened by "
                     "T; the term is scaled by T^2)."))
    distill_feature_pairs: str = field(
        default="",
        metadata=opt("Feature distillation: student block : teacher block pairs, e.g. "
                     "'1:5,3:11' (0-based). Each student block's patch map, through a learned "
                     "linear projection to the teacher's width, is pulled towards the teacher "
                     "block's (resized to the student's grid when the grids differ; grids of "
                     "another aspect ratio are refused). Empty: no feature term."))
    distill_feature_loss: str = field(
        default="mse",
        metadata=opt("Distance of --distill-feature-pairs: 'mse' (mean squared error over "
                     "all elements) or 'cosine' (1 - cosine similarity per token).",
                     choices=("mse", "cosine")))
    distill_feature_weight: float = field(
        default=1.0,
        metadata=opt("Weight of the feature term (the mean over the pairs), added to the "
                     "response loss."))
    distill_pooled_weight: float = field(
        default=0.0,
        metadata=opt("Pooled-feature term: the student's pooled features (what its "
                     "classifier reads), through a learned linear projection to the "
                     "teacher's width, against the teacher's pooled features by "
                     "--distill-feature-loss, with this weight (0: off). Online, or from a "
                     "cache written with tools/cache_teacher.py --pooled-features."))

    distill_relation_pairs: str = field(
        default="",
        metadata=opt("Relation distillation (MiniLMv2): student block : teacher block "
                     "pairs, e.g. '3:11'. For each, the KL of the teacher's query-query, "
                     "key-key and value-value relations (softmax(x x^T / sqrt(d)) over the "
                     "tokens) from the student's, with both models' heads re-split into "
                     "--distill-relation-heads relation heads, so their head counts may "
                     "differ; the paired blocks must see the same number of tokens. Empty: "
                     "no relation term."))
    distill_relation_heads: int = field(
        default=0,
        metadata=opt("Relation heads R of --distill-relation-pairs: R must divide both "
                     "models' widths and be a multiple of the tensor-parallel size. 0: the "
                     "student's head count."))
    distill_relation_weight: float = field(
        default=1.0,
        metadata=opt("Weight of each relation pair's term (the mean of its three "
                     "relations), added to the loss in the student block's backward."))

    def feature_pairs(self) -> list[tuple[int, int]]:
        """--distill-feature-pairs as [(student block, teacher block)], by student block
        (ValueError naming the flag when malformed)."""
        return _pairs("--distill-feature-pairs", self.distill_feature_pairs)

    def relation_pairs(self) -> list[tuple[int, int]]:
        """--distill-relation-pairs as [(student block, teacher block)], by student block."""
        return _pairs("--distill-relation-pairs", self.distill_relation_pairs)


def _pairs(flag: str, text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        try:
            s, t = (int(v) for v in item.split(":"))
        except ValueError:
            raise ValueError(f"{flag} {text}: '{item}' is not STUDENT:TEACHER block "
                             "numbers") from None
        pairs.append((s, t))
    return sorted(pairs)


@dataclass
class DistillationRunConfig:
    """Everything `megavit.distill` is configured by."""

    base: Config
    distillation: DistillationConfig

    @property
    def model(self) -> ModelConfig:
        return self.base.model


SECTIONS: tuple[tuple[str, type], ...] = (*BASE_SECTIONS, ("distillation", DistillationConfig))
PROG = "python -m megavit.distill"


def distillation_parser() -> argparse.ArgumentParser:
    return build_parser(PROG, SECTIONS, "Distil a frozen teacher ViT into a student ViT "
                        "classifier with tensor, sequence, pipeline and data parallelism.")


def parse_distillation_args(argv: Sequence[str] | None = None) -> DistillationRunConfig:
    """Flags -> DistillationRunConfig (a preset first, explicit flags on top)."""
    sections, presets = parse_sections(distillation_parser(), SECTIONS, argv)
    distill = DistillationConfig(**sections.pop("distillation"))
    return DistillationRunConfig(config_from_sections(sections, presets["preset"]), distill)


def validate_distillation(cfg: DistillationRunConfig, world_size: int = 1) -> None:
    """`validate`'s checks, then the distillation ones; ConfigError naming each flag."""
    validate(cfg.base, world_size)
    d, problems = cfg.distillation, []
    if not d.teacher_checkpoint and not d.distill_cache:
        problems.append("--teacher-checkpoint is required: the frozen teacher's checkpoint "
                        "directory (or --distill-cache, a cache of its logits)")
    elif d.teacher_checkpoint and not Path(d.teacher_checkpoint).is_dir():
        problems.append(f"--teacher-checkpoint {d.teacher_checkpoint}: no such directory")
    if cfg.base.parallel.data_parallel_sharding_strategy == "full":
        problems.append("--data-parallel-sharding-strategy full: distillation runs are not fully "
                        "sharded yet (its extra modules sit outside the FSDP2 units); use "
                        "--use-distributed-optimizer")
    if not 0.0 <= d.distill_alpha <= 1.0:
        problems.append(f"--distill-alpha {d.distill_alpha}: must be in [0, 1]")
    if not d.distill_temperature > 0.0:
        problems.append(f"--distill-temperature {d.distill_temperature}: must be positive")
    layers = cfg.base.model.num_layers
    for flag, read in (("--distill-feature-pairs", d.feature_pairs),
                       ("--distill-relation-pairs", d.relation_pairs)):
        try:
            pairs = read()
        except ValueError as e:
            problems.append(str(e))
            continue
        students = [s for s, _ in pairs]
        if len(set(students)) != len(students):
            problems.append(f"{flag}: a student block may be paired once")
        if bad := [s for s in students if not 0 <= s < layers]:
            problems.append(f"{flag}: student block(s) {bad} outside 0..{layers - 1}")
        if bad := [t for _, t in pairs if t < 0]:
            problems.append(f"{flag}: teacher block(s) {bad} are negative")
    tp = cfg.base.parallel.tensor_model_parallel_size
    heads = d.distill_relation_heads or cfg.base.model.num_attention_heads
    if d.distill_relation_pairs and (heads < 1 or heads % tp
                                     or cfg.base.model.hidden_size % heads):
        problems.append(f"--distill-relation-heads {heads}: must be at least 1, a multiple of "
                        f"--tensor-model-parallel-size {tp} and divide --hidden-size "
                        f"{cfg.base.model.hidden_size}")
    if d.distill_relation_weight < 0:
        problems.append(f"--distill-relation-weight {d.distill_relation_weight}: must be 0 or "
                        "more")
    if d.distill_cache and (d.distill_feature_pairs or d.distill_relation_pairs):
        problems.append("--distill-cache holds the teacher's logits (and pooled features) "
                        "only: feature and relation pairs need the teacher online (drop "
                        "--distill-cache)")
    if d.distill_cache and not Path(d.distill_cache).is_dir():
        problems.append(f"--distill-cache {d.distill_cache}: no such directory")
    if d.distill_pooled_weight < 0:
        problems.append(f"--distill-pooled-weight {d.distill_pooled_weight}: must be 0 or "
                        "more")
    if d.distill_feature_weight < 0:
        problems.append(f"--distill-feature-weight {d.distill_feature_weight}: must be 0 or "
                        "more")
    if cfg.base.training.freeze_backbone:
        problems.append("--freeze-backbone: a linear probe learns from labels; distillation "
                        "trains the student's backbone")
    if cfg.base.data.dataset == "mnist-seg":
        problems.append("--dataset mnist-seg has a label per pixel: distillation trains a "
                        "classifier")
    if cfg.base.model.feature_layers:
        problems.append(f"--feature-layers {cfg.base.model.feature_layers}: a classifier "
                        "reads the last block only")
    if cfg.base.model.num_classes == 0:
        problems.append("--num-classes 0 builds a feature extractor; the student needs the "
                        "teacher's classes")
    if problems:
        raise ConfigError("the configuration has problems:\n  - " + "\n  - ".join(problems)
                          if len(problems) > 1 else problems[0])
