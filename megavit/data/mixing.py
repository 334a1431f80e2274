"""Mixup and CutMix over each micro-batch, keyed so that every layout mixes alike.

A micro-batch is the unit: global micro-batch j of iteration i holds global-batch positions
[j m, (j + 1) m) in every layout (the DP slices are contiguous), so mixing within it and
drawing its randomness from (seed, i, j) gives the same images and targets at any TP / PP /
DP layout and after a resume (a different --micro-batch-size pairs other images, as a
different per-GPU batch does in timm). Each image is paired with the previous one in the
micro-batch (`roll(1, 0)`, torchvision's pairing).

Per micro-batch, as torchvision.transforms.v2's RandomChoice([CutMix, MixUp]) draws it from
the torch generator: the choice (CutMix with probability `switch_prob`), then lambda ~
Beta(alpha, alpha), and for CutMix the box centre (x, then y), the box being sqrt(1 - lambda)
of each side, clipped to the image, and lambda corrected to the area actually kept. Targets:
lambda t + (1 - lambda) roll(t). Where torchvision imports (NGC, .venv-timm) its MixUp /
CutMix mix the images under the same seeded generator; `draw_mixing` reproduces its draws
so that pipeline stages without images (and the fallback) compute the same targets
(tests/test_augment.py checks that both agree).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from megavit.parallel.sharding import param_seed


@contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """The CPU torch generator seeded with `seed` inside the block, restored after it
    (torchvision's transforms draw from it). Only the CPU generator: `torch.manual_seed`
    would also queue seeds for every accelerator backend, a cost per image."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


@dataclass(frozen=True)
class Mixing:
    """What one micro-batch's mixing drew: 'mixup' or 'cutmix', lambda (for CutMix the kept
    area's share) and the CutMix box (x1, y1, x2, y2) in pixels."""

    kind: str
    lam: float
    box: tuple[int, int, int, int] | None = None


def mixing_seed(seed: int, iteration: int, micro_batch: int) -> int:
    """Global micro-batch `micro_batch` of iteration `iteration`'s key."""
    return param_seed(seed, f"mix-{iteration}-{micro_batch}")


def _beta(alpha: float) -> float:
    return float(torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])).sample(()))


def draw_mixing(mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                height: int, width: int) -> Mixing:
    """One micro-batch's draw from the current torch generator (see the module docstring;
    an alpha of 0 turns that kind off)."""
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = int(torch.multinomial(torch.tensor([switch_prob, 1 - switch_prob]), 1)) == 0
    else:
        use_cutmix = cutmix_alpha > 0
    if not use_cutmix:
        return Mixing("mixup", _beta(mixup_alpha))
    lam = _beta(cutmix_alpha)
    cx = int(torch.randint(width, size=(1,)))
    cy = int(torch.randint(height, size=(1,)))
    r = 0.5 * math.sqrt(1.0 - lam)
    half_w, half_h = int(r * width), int(r * height)
    x1, y1 = max(cx - half_w, 0), max(cy - half_h, 0)
    x2, y2 = min(cx + half_w, width), min(cy + half_h, height)
    kept = 1.0 - (x2 - x1) * (y2 - y1) / (width * height)
    return Mixing("cutmix", kept, (x1, y1, x2, y2))


def mix_images(images: torch.Tensor, mixing: Mixing) -> torch.Tensor:
    """images [m, c, H, W] mixed with their roll(1, 0) partners."""
    if mixing.kind == "mixup":      # roll(x) (1 - lambda) + x lambda, in place where it can
        return images.roll(1, 0).mul_(1.0 - mixing.lam).add_(images.mul(mixing.lam))
    x1, y1, x2, y2 = mixing.box
    out = images.clone()
    out[..., y1:y2, x1:x2] = images[..., y1:y2, x1:x2].roll(1, 0)
    return out


def mix_targets(targets: torch.Tensor, mixing: Mixing) -> torch.Tensor:
    """targets [m, C] float -> lambda t + (1 - lambda) roll(t); each row still sums as t's."""
    return targets * mixing.lam + targets.roll(1, 0) * (1.0 - mixing.lam)


def torchvision_mixer(mixup_alpha: float, cutmix_alpha: float, switch_prob: float):
    """torchvision.transforms.v2's CutMix / MixUp choice as one callable (images [m, c, H, W],
    targets [m, C]) -> (images, targets), or None where torchvision does not import."""
    try:
        from torchvision.transforms import v2
    except Exception:  # noqa: BLE001 — absent, or built for another torch
        return None
    if mixup_alpha > 0 and cutmix_alpha > 0:
        return v2.RandomChoice([v2.CutMix(alpha=cutmix_alpha), v2.MixUp(alpha=mixup_alpha)],
                               p=[switch_prob, 1 - switch_prob])
    if cutmix_alpha > 0:
        return v2.CutMix(alpha=cutmix_alpha)
    return v2.MixUp(alpha=mixup_alpha)
