"""What a classifier is trained towards: class labels turned into target distributions.

A dataset's labels come in one of two forms:

    labels [n] int64          one class per image (digits, an image folder, .cls shards)
    labels [n, K] int64       up to K classes per image (multi-label shards, JFT-style),
                              padded with -1; the first entry is the image's primary class

`class_targets` turns either into targets [n, C] float32 (one-hot or multi-hot);
`smooth_targets` applies label smoothing (t (1 - eps) + eps / C, as timm's Mixup and
BinaryCrossEntropy do); Mixup / CutMix (megavit/data/mixing.py) produce soft targets of
the same shape. The loss reads labels or targets alike (tasks/classification.py).
"""

from __future__ import annotations

import torch

PAD_LABEL = -1   # fills a multi-label row [K] past its image's labels


def is_multi_label(labels: torch.Tensor) -> bool:
    """True for labels [n, K] int64 (a padded label list per image)."""
    return labels.dim() == 2 and not labels.is_floating_point()


def primary_labels(labels: torch.Tensor) -> torch.Tensor:
    """[n] int64: the single label, or the first of each multi-label row."""
    return labels[:, 0] if is_multi_label(labels) else labels


def class_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels [n] or [n, K] int64 (-1: padding) -> multi-hot targets [n, C] float32;
    targets already [n, C] float pass through (as float32)."""
    if labels.is_floating_point():
        return labels.float()
    rows = labels.unsqueeze(1) if labels.dim() == 1 else labels
    valid = rows >= 0
    out = torch.zeros(rows.shape[0], num_classes, device=labels.device)
    out.scatter_(1, rows.clamp(min=0), valid.float())
    return out


def smooth_targets(targets: torch.Tensor, eps: float) -> torch.Tensor:
    """targets [n, C] -> targets (1 - eps) + eps / C (unchanged for eps 0)."""
    if eps == 0.0:
        return targets
    return targets * (1.0 - eps) + eps / targets.shape[-1]


def label_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 hits, precision@1 hits) [n] bool of logits [n, C] against labels [n] or [n, K]:
    top-1 compares the arg-max with the (primary) label; precision@1 asks whether the arg-max
    is any of the image's labels (the same as top-1 for single labels)."""
    best = logits.argmax(dim=-1)
    top1 = best == primary_labels(labels)
    if not is_multi_label(labels):
        return top1, top1
    return top1, (labels == best.unsqueeze(1)).any(dim=1)
