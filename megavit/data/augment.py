"""Training-time augmentation whose randomness depends on (seed, iteration, position in the
global batch) only, so every parallel layout, and a resumed run, sees the same augmented
images.

Recipes (`--augment`; each component also a flag, `recipe_from_config`):

    none        nothing
    affine      a random rotation (up to +-5 degrees), scale (+-5 %) and translation (up to
                12.5 % of the image each way), bilinear with edge padding, over the batch
    inception   random-resized crop (area share U(0.08, 1), aspect ratio log-U(3/4, 4/3),
                resized to --img-h x --img-w) and horizontal flip (p 0.5)
    deit        inception + RandAugment (2 operations at magnitude 9 of 10, timm's `rand-m9`)
                + Mixup 0.8 / CutMix 1.0, switching with p 0.5 + label smoothing 0.1: DeiT's
                published recipe
    augreg      the same numbers (the AugReg paper's levels vary RandAugment's magnitude and
                Mixup's alpha: set them with --rand-augment-magnitude / --mixup)

Per image, in this order, under a torch generator seeded by (seed, the image's global id =
iteration x global batch + position): crop, flip, RandAugment (on 256 levels). Where
torchvision imports (NGC; .venv-timm here) its transforms v2 (`RandomResizedCrop`,
`RandomHorizontalFlip`, `RandAugment` with 31 magnitude bins) run them; elsewhere
megavit/data/image_ops.py does, drawing the same values in the same order, so both paths
give the same images (tests/test_augment.py). Mixup / CutMix mix each micro-batch
(megavit/data/mixing.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from megavit.data import image_ops
from megavit.data.mixing import (Mixing, draw_mixing, mix_images, mix_targets, mixing_seed,
                                 seeded_torch_rng, torchvision_mixer)
from megavit.parallel.sharding import param_seed

MAX_ROTATION_DEG = 5.0
MAX_SCALE = 0.05
MAX_SHIFT = 0.125  # fraction of the image size


def affine_params(global_batch_size: int, seed: int, iteration: int) -> torch.Tensor:
    """One 2x3 affine matrix per sample of iteration `iteration`'s global batch: [G, 2, 3]."""
    g = torch.Generator().manual_seed(param_seed(seed, f"augment-{iteration}"))
    n = global_batch_size
    angle = (torch.rand(n, generator=g) * 2 - 1) * MAX_ROTATION_DEG * math.pi / 180
    scale = 1 + (torch.rand(n, generator=g) * 2 - 1) * MAX_SCALE
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * MAX_SHIFT * 2  # [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                        torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def apply_affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """images [n, c, H, W], theta [n, 2, 3] -> augmented images [n, c, H, W]."""
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


# ---------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentRecipe:
    """What a training image goes through. crop_min_scale None: no random-resized crop;
    rand_augment_ops 0: no RandAugment; mixup / cutmix 0: off."""

    affine: bool = False
    crop_min_scale: float | None = None
    hflip: float = 0.0
    rand_augment_ops: int = 0
    rand_augment_magnitude: float = 9.0     # of 10 (timm's rand-mM)
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0

    @property
    def per_image(self) -> bool:
        return self.crop_min_scale is not None or self.hflip > 0 or self.rand_augment_ops > 0

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def describe(self) -> str:
        parts = []
        if self.affine:
            parts.append("affine")
        if self.crop_min_scale is not None:
            parts.append(f"random-resized crop (scale {self.crop_min_scale:g}-1)")
        if self.hflip:
            parts.append(f"flip p {self.hflip:g}")
        if self.rand_augment_ops:
            parts.append(f"RandAugment {self.rand_augment_ops} ops m{self.rand_augment_magnitude:g}")
        if self.mixup:
            parts.append(f"Mixup {self.mixup:g}")
        if self.cutmix:
            parts.append(f"CutMix {self.cutmix:g}")
        if self.mixup and self.cutmix:
            parts.append(f"switch p {self.mixup_switch_prob:g}")
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        return ", ".join(parts) or "none"


_DEIT = AugmentRecipe(crop_min_scale=0.08, hflip=0.5, rand_augment_ops=2,
                      rand_augment_magnitude=9.0, mixup=0.8, cutmix=1.0,
                      mixup_switch_prob=0.5, label_smoothing=0.1)
PRESETS: dict[str, AugmentRecipe] = {
    "none": AugmentRecipe(),
    "affine": AugmentRecipe(affine=True),
    "inception": AugmentRecipe(crop_min_scale=0.08, hflip=0.5),
    "deit": _DEIT,
    "augreg": _DEIT,
}
# DataConfig / TrainingConfig field -> AugmentRecipe field, where the flag overrides the preset
OVERRIDES = {"random_crop_min_scale": "crop_min_scale", "hflip": "hflip",
             "rand_augment_ops": "rand_augment_ops",
             "rand_augment_magnitude": "rand_augment_magnitude", "mixup": "mixup",
             "cutmix": "cutmix", "mixup_switch_prob": "mixup_switch_prob"}


def recipe_from_config(data, label_smoothing: float | None) -> AugmentRecipe:
    """--augment's preset with every component flag that was set (not None) in its place;
    --label-smoothing unset: the preset's (0.1 for deit / augreg, else 0)."""
    recipe = PRESETS[data.augment]
    changes = {name: getattr(data, flag) for flag, name in OVERRIDES.items()
               if getattr(data, flag, None) is not None}
    if changes.get("crop_min_scale") == 1.0 and recipe.crop_min_scale is None:
        changes.pop("crop_min_scale")
    if label_smoothing is not None:
        changes["label_smoothing"] = label_smoothing
    return dataclasses.replace(recipe, **changes)


# ---------------------------------------------------------------------------------------
# Per image
# ---------------------------------------------------------------------------------------


def image_seed(seed: int, sample_id: int) -> int:
    """The key of the image at global id `sample_id` (iteration x G + position)."""
    return param_seed(seed, f"image-augment-{sample_id}")


def torchvision_version() -> str | None:
    """torchvision's version where its transforms v2 import beside this torch, else None."""
    try:
        import torchvision
        from torchvision.transforms import v2  # noqa: F401
    except Exception:  # noqa: BLE001 — absent, or built for another torch
        return None
    return torchvision.__version__


def resolve_backend(backend: str) -> str:
    """'auto' -> 'torchvision' where its transforms v2 import, else 'torch'."""
    if backend == "auto":
        return "torchvision" if torchvision_version() else "torch"
    return backend


class ImageAugmenter:
    """The per-image part of a recipe: pixels [c, h, w] (uint8, or float in [0, 1]) at any
    size -> [c, H, W] uint8 at the model's size, computed on uint8 as torchvision's
    pipeline does. `backend` 'torchvision' or 'torch' (image_ops);
    'auto' takes torchvision where it imports."""

    def __init__(self, recipe: AugmentRecipe, size: tuple[int, int], seed: int,
                 backend: str = "auto") -> None:
        self.recipe, self.size, self.seed = recipe, tuple(size), seed
        self.backend = backend = resolve_backend(backend)
        self.magnitude_bin = image_ops.rand_augment_magnitude(recipe.rand_augment_magnitude)
        self._steps = self._torchvision_steps() if backend == "torchvision" else None

    def _torchvision_steps(self) -> list[Callable]:
        from torchvision.transforms import v2

        r, steps = self.recipe, []
        if r.crop_min_scale is not None:
            steps.append(v2.RandomResizedCrop(
                self.size, scale=(r.crop_min_scale, 1.0), ratio=image_ops.CROP_RATIO,
                interpolation=v2.InterpolationMode.BILINEAR, antialias=True))
        if r.hflip:
            steps.append(v2.RandomHorizontalFlip(r.hflip))
        if r.rand_augment_ops:
            steps.append(v2.RandAugment(r.rand_augment_ops, self.magnitude_bin,
                                        image_ops.MAGNITUDE_BINS))
        return steps

    def __call__(self, pixels: torch.Tensor, sample_id: int) -> torch.Tensor:
        """pixels [c, h, w] (uint8, or float in [0, 1]) -> [c, H, W] uint8 (a dataset
        normalises a stack of them: `Preprocessing.normalise_levels`)."""
        if pixels.dtype != torch.uint8:
            pixels = (pixels * 255.0).round().clamp(0, 255).to(torch.uint8)
        with seeded_torch_rng(image_seed(self.seed, sample_id)):
            x = self._torchvision(pixels) if self._steps is not None else self._torch(pixels)
        return x.to(torch.uint8)

    def _fit(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape[-2:]) == self.size:
            return pixels
        return image_ops.apply_resized_crop(pixels, (0, 0, *pixels.shape[-2:]), self.size)

    def _torchvision(self, x: torch.Tensor) -> torch.Tensor:
        if self.recipe.crop_min_scale is None:
            x = self._fit(x)
        for step in self._steps:
            x = step(x)
        return x

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        r = self.recipe
        if r.crop_min_scale is not None:
            box = image_ops.draw_resized_crop(*x.shape[-2:], scale=(r.crop_min_scale, 1.0))
            x = image_ops.apply_resized_crop(x, box, self.size)
        else:
            x = self._fit(x)
        if r.hflip and image_ops.draw_flip(r.hflip):
            x = x.flip(-1)
        if r.rand_augment_ops:
            ops = image_ops.draw_rand_augment(r.rand_augment_ops, self.magnitude_bin,
                                              *x.shape[-2:])
            x = image_ops.apply_rand_augment(x.float(), ops)
        return x


# ---------------------------------------------------------------------------------------
# Per micro-batch: Mixup / CutMix
# ---------------------------------------------------------------------------------------


class BatchMixer:
    """Mixup / CutMix of each micro-batch (megavit/data/mixing.py): `__call__` mixes images
    [m, c, H, W] (or None on stages without images) and turns targets [m, C] into mixed
    ones, keyed by (seed, iteration, global micro-batch index)."""

    def __init__(self, recipe: AugmentRecipe, size: tuple[int, int], seed: int,
                 backend: str = "auto") -> None:
        self.recipe, self.size, self.seed = recipe, tuple(size), seed
        self.backend = backend = resolve_backend(backend)
        self._library = (torchvision_mixer(recipe.mixup, recipe.cutmix, recipe.mixup_switch_prob)
                         if backend == "torchvision" else None)

    def draw(self, iteration: int, micro_batch: int) -> Mixing:
        r = self.recipe
        with seeded_torch_rng(mixing_seed(self.seed, iteration, micro_batch)):
            return draw_mixing(r.mixup, r.cutmix, r.mixup_switch_prob, *self.size)

    def __call__(self, images: torch.Tensor | None, targets: torch.Tensor, iteration: int,
                 micro_batch: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        if images is not None and self._library is not None:
            with seeded_torch_rng(mixing_seed(self.seed, iteration, micro_batch)):
                return self._library(images, targets)
        mixing = self.draw(iteration, micro_batch)
        return (None if images is None else mix_images(images, mixing),
                mix_targets(targets, mixing))
