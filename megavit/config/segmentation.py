"""Flags of `python -m megavit.segment`: `megavit.pretrain`'s model, parallel, training,
precision, data, logging and checkpoint flags, plus the dense-prediction head below. The
ViT is built without a classifier; every patch token is decoded.

    cfg = parse_segmentation_args(["--preset", "vit-debug", "--dataset", "mnist-seg"])
    validate_segmentation(cfg, world_size=2)
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from megavit.config.fields import ConfigError, opt
from megavit.config.flags import SECTIONS as BASE_SECTIONS
from megavit.config.flags import build_parser, config_from_sections, parse_sections
from megavit.config.model import ModelConfig
from megavit.config.run import Config
from megavit.config.validation import validate

SEGMENTATION_DATASETS = ("mnist-seg", "seg-folder")


@dataclass
class SegmentationConfig:
    """Semantic segmentation: the feature pyramid neck on the last block's patch map and
    the per-pixel decoder (both replicated over tensor-parallel ranks, on the last pipeline
    stage)."""

    neck: str = field(
        default="simple-pyramid",
        metadata=opt("'simple-pyramid' (ViTDet, for a plain stack: the last block's map at 4x, "
                     "2x, 1x and 1/2 its resolution by transposed convolutions, identity and "
                     "max-pooling), 'fpn' (for a stack with --patch-merge-layers: a feature "
                     "pyramid network over the maps of --feature-layers, by default the block "
                     "before each merge and the last block; without merges every level has "
                     "the same resolution) or 'none' (the last block's map alone).",
                     choices=("simple-pyramid", "fpn", "none")))
    neck_channels: int = field(
        default=256, metadata=opt("Channels of every pyramid level (ViTDet: 256)."))
    decoder_channels: int = field(
        default=128,
        metadata=opt("Channels of the decoder: each level is convolved (3x3) to this width, "
                     "upsampled to the finest level and summed before the per-class 1x1 "
                     "convolution (Panoptic FPN's semantic head)."))
    ignore_index: int = field(
        default=255,
        metadata=opt("Label value of pixels that count in neither the loss nor the metrics "
                     "(ADE20K / Cityscapes use 255)."))


@dataclass
class SegmentationRunConfig:
    """Everything `megavit.segment` is configured by."""

    base: Config
    segmentation: SegmentationConfig

    @property
    def model(self) -> ModelConfig:
        return self.base.model


SECTIONS: tuple[tuple[str, type], ...] = (*BASE_SECTIONS, ("segmentation", SegmentationConfig))
PROG = "python -m megavit.segment"


def segmentation_parser() -> argparse.ArgumentParser:
    return build_parser(PROG, SECTIONS, "Train a ViT for semantic segmentation (a feature "
                        "pyramid and a per-pixel decoder on the last block) with tensor, "
                        "sequence, pipeline and data parallelism.")


def parse_segmentation_args(argv: Sequence[str] | None = None) -> SegmentationRunConfig:
    """Flags -> SegmentationRunConfig (a preset first, explicit flags on top). --dataset
    defaults to mnist-seg, --pooling to gap (no class token; --pooling cls keeps one,
    dropped before the neck)."""
    sections, presets = parse_sections(segmentation_parser(), SECTIONS, argv)
    seg = SegmentationConfig(**sections.pop("segmentation"))
    sections["data"].setdefault("dataset", "mnist-seg")
    sections["model"].setdefault("pooling", "gap")
    base = config_from_sections(sections, presets["preset"])
    if seg.neck == "fpn" and not base.model.feature_layers:
        base.model = dataclasses.replace(base.model, feature_layers=default_feature_layers(
            base.model))
    return SegmentationRunConfig(base, seg)


def default_feature_layers(model: ModelConfig) -> str:
    """--neck fpn's levels when --feature-layers is not given: the block before each merge
    (the last at each resolution) and the last block, e.g. '1,3,5' for merges '1,3' of 6
    blocks ('' when the merge layers do not parse: validation names them)."""
    try:
        layers = {*model.merge_layers(), model.num_layers - 1}
    except ValueError:
        return ""
    return ",".join(str(l) for l in sorted(layers) if 0 <= l < model.num_layers)


def validate_segmentation(cfg: SegmentationRunConfig, world_size: int = 1) -> None:
    """`validate`'s checks, then the segmentation ones; ConfigError naming each flag."""
    validate(cfg.base, world_size)
    m, s, d = cfg.base.model, cfg.segmentation, cfg.base.data
    problems = []
    if d.dataset not in SEGMENTATION_DATASETS:
        problems.append(f"--dataset {d.dataset} has one class per image; segmentation needs "
                        f"label maps: {', '.join(SEGMENTATION_DATASETS)}")
    if cfg.base.parallel.data_parallel_sharding_strategy == "full":
        problems.append("--data-parallel-sharding-strategy full: segmentation runs are not fully "
                        "sharded yet (its extra modules sit outside the FSDP2 units); use "
                        "--use-distributed-optimizer")
    if m.pooling == "map":
        problems.append("--pooling map pools the tokens into one vector; segmentation decodes "
                        "every patch token: use --pooling gap (no class token) or cls")
    if m.num_classes and d.dataset == "mnist-seg":
        problems.append("--num-classes: mnist-seg has 11 classes (background and ten "
                        "digits); leave it unset")
    if d.dataset == "seg-folder" and not (m.num_classes and d.data_path):
        problems.append("--dataset seg-folder needs --data-path (images/ and annotations/) "
                        "and --num-classes (label values 0..K-1)")
    if d.augment != "none":
        problems.append(f"--augment {d.augment}: image augmentations would have to move the "
                        "label maps too, which megavit does not do yet; mnist-seg composes a "
                        "fresh canvas on every draw instead (use --augment none)")
    if d.loss != "softmax":
        problems.append("--loss sigmoid: segmentation trains per-pixel softmax cross-entropy")
    for flag, value in (("--neck-channels", s.neck_channels),
                        ("--decoder-channels", s.decoder_channels)):
        if value < 1:
            problems.append(f"{flag} must be at least 1 (got {value})")
    problems += _check_neck(m, s)
    if s.neck == "simple-pyramid" and m.hidden_size % 4:
        problems.append(f"--neck simple-pyramid halves --hidden-size {m.hidden_size} twice "
                        "on its way to 4x: it must be divisible by 4")
    if not 0 <= s.ignore_index:
        problems.append(f"--ignore-index must be 0 or more (got {s.ignore_index})")
    if problems:
        raise ConfigError("the configuration has problems:\n  - " + "\n  - ".join(problems)
                          if len(problems) > 1 else problems[0])


def _check_neck(m: ModelConfig, s: SegmentationConfig) -> list[str]:
    """--neck fpn reads --feature-layers ending with the last block; the other necks read
    the last block alone."""
    try:
        features, merges = m.feature_layer_list(), m.merge_layers()
    except ValueError:
        return []                                   # named by `validate`
    last = m.num_layers - 1
    if s.neck != "fpn":
        return ([f"--feature-layers {m.feature_layers}: --neck {s.neck} reads the last block "
                 "alone; the feature layers feed --neck fpn"] if features else [])
    problems = []
    if features[-1:] != [last]:
        problems.append(f"--neck fpn --feature-layers {m.feature_layers}: the last block "
                        f"({last}) must be among them (the blocks after the last feature "
                        "layer would not be trained)")
    if last in merges:
        problems.append(f"--neck fpn --patch-merge-layers {m.patch_merge_layers}: a merge "
                        f"after the last block ({last}) would not be read by the neck")
    return problems


def with_backbone_defaults(cfg: SegmentationRunConfig) -> SegmentationRunConfig:
    """The ViT built for segmentation: no classifier (num_classes 0)."""
    return dataclasses.replace(cfg, base=dataclasses.replace(
        cfg.base, model=dataclasses.replace(cfg.base.model, num_classes=0)))
