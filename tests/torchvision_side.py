"""Run in the timm venv (torch 2.14.1 + torchvision 0.29.1) by tests/test_augment.py: the
augmentation's two paths side by side, where torchvision imports. Writes a JSON report to
the path given as the only argument:

    crop_boxes          [agreeing, tried]: torchvision's RandomResizedCrop.make_params vs
                        image_ops.draw_resized_crop under the same seeded generator
    images              [agreeing, tried, largest difference]: ImageAugmenter's torchvision
                        path vs its torch path (deit recipe: crop, flip, RandAugment)
    mixing              [agreeing, tried, largest difference]: BatchMixer's two paths
                        (images and targets)
    operations          [differing, tried, examples]: RandAugment's 14 operations at 11
                        magnitudes and both signs on 1- and 3-channel uint8 images of five
                        sizes, torchvision's kernel vs image_ops.apply_rand_augment
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from megavit.data import image_ops  # noqa: E402
from megavit.data.augment import PRESETS, BatchMixer, ImageAugmenter  # noqa: E402
from megavit.data.mixing import seeded_torch_rng  # noqa: E402


def crop_boxes(tries: int = 300) -> list[int]:
    agree = 0
    for k in range(tries):
        h, w = 20 + k % 17, 30 - k % 13
        crop = v2.RandomResizedCrop(16, scale=(0.08, 1.0))
        with seeded_torch_rng(k):
            theirs = crop.make_params([torch.zeros(3, h, w)])
        with seeded_torch_rng(k):
            ours = image_ops.draw_resized_crop(h, w)
        agree += (theirs["top"], theirs["left"], theirs["height"], theirs["width"]) == ours
    return [agree, tries]


def images(tries: int = 120) -> list:
    recipe = PRESETS["deit"]
    library = ImageAugmenter(recipe, (24, 20), seed=5, backend="torchvision")
    fallback = ImageAugmenter(recipe, (24, 20), seed=5, backend="torch")
    g = torch.Generator().manual_seed(0)
    agree, worst = 0, 0.0
    for k in range(tries):
        c = 3 if k % 2 else 1
        pixels = torch.rand(c, 31 + k % 9, 27 + k % 5, generator=g)   # float, or decoded uint8
        if k % 3 == 0:
            pixels = (pixels * 255).to(torch.uint8).permute(1, 2, 0).contiguous().permute(2, 0, 1)
        a, b = library(pixels, k), fallback(pixels, k)
        diff = (a - b).abs().max().item()
        worst = max(worst, diff)
        agree += diff <= 1e-5
    return [agree, tries, worst]


def mixing(tries: int = 60) -> list:
    recipe = PRESETS["deit"]
    library = BatchMixer(recipe, (12, 10), seed=3, backend="torchvision")
    fallback = BatchMixer(recipe, (12, 10), seed=3, backend="torch")
    g = torch.Generator().manual_seed(1)
    agree, worst = 0, 0.0
    for k in range(tries):
        x = torch.randn(6, 3, 12, 10, generator=g)
        t = torch.nn.functional.one_hot(torch.randint(0, 5, (6,), generator=g), 5).float()
        xa, ta = library(x.clone(), t.clone(), k // 4, k % 4)
        xb, tb = fallback(x.clone(), t.clone(), k // 4, k % 4)
        diff = max((xa - xb).abs().max().item(), (ta - tb).abs().max().item())
        worst = max(worst, diff)
        agree += diff <= 1e-6
    return [agree, tries, worst]


def operations() -> list:
    """[differing outputs, tried, the first few that differ]."""
    ra = v2.RandAugment()
    g = torch.Generator().manual_seed(2)
    differ, tried = [], 0
    for c, h, w in ((1, 23, 29), (3, 23, 29), (3, 32, 32), (1, 41, 20), (3, 57, 44)):
        img = torch.randint(0, 256, (c, h, w), dtype=torch.uint8, generator=g)
        for name, (top, signed) in image_ops.OPERATIONS.items():
            space = v2.RandAugment._AUGMENTATION_SPACE[name][0](31, h, w)
            for bin_ in range(0, 31, 3):
                for sign in ((1, -1) if signed else (1,)):
                    value = float(space[bin_]) * sign if space is not None else 0.0
                    theirs = ra._apply_image_or_video_transform(
                        img, name, value, interpolation=v2.InterpolationMode.NEAREST,
                        fill=ra._fill)
                    ours = image_ops.apply_rand_augment(img.float(), [(name, value)])
                    tried += 1
                    if not torch.equal(ours, theirs.float()):
                        differ.append(f"{name} {c}x{h}x{w} bin {bin_} value {value:.3f}")
    return [len(differ), tried, differ[:5]]


if __name__ == "__main__":
    report = {"crop_boxes": crop_boxes(), "images": images(), "mixing": mixing(),
              "operations": operations()}
    Path(sys.argv[1]).write_text(json.dumps(report))
