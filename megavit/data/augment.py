"""Training-time augmentation whose randomness depends on (seed, iteration, position in the
global batch) only, so every parallel layout sees the same augmented images.

`affine`: a random rotation (up to +-5 degrees), scale (+-5 %) and translation (up to
12.5 % of the image each way), applied with bilinear resampling and edge padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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
