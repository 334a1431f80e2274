"""Attention maps drawn over their image with matplotlib (PNG files).

A map [gh, gw] becomes a heat map of the image's pixels by the ViT authors' recipe:
normalised to [0, 1], upsampled (bilinear) to the image size, blurred by a Gaussian of
about one patch (sigma = patch / 2 px), normalised again; drawn with a colour map at 50 %
over the image (greyscale images in grey).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def heat(grid_map: torch.Tensor, size: tuple[int, int], patch: float) -> np.ndarray:
    """[gh, gw] -> [H, W] in [0, 1] (normalise, upsample, blur ~ one patch, normalise)."""
    from scipy.ndimage import gaussian_filter

    m = grid_map.detach().double()
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    up = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    blurred = gaussian_filter(up.numpy(), sigma=max(patch / 2, 0.5))
    lo, hi = blurred.min(), blurred.max()
    return (blurred - lo) / max(hi - lo, 1e-12)


def _show(ax, image: np.ndarray, h: np.ndarray | None, title: str, cmap: str) -> None:
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
    if h is not None:
        ax.imshow(h, cmap=cmap, alpha=0.5, vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def save_panels(path: str | Path, image: np.ndarray, maps: list[torch.Tensor],
                titles: list[str], patch: float, columns: int | None = None,
                cmap: str = "jet", suptitle: str | None = None, with_image: bool = True
                ) -> Path:
    """One PNG: the image (if `with_image`) then each map [gh, gw] over it, in a grid of
    `columns` (default: one row). `image`: [H, W] or [H, W, 3] in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ([(None, "image")] if with_image else []) + list(zip(maps, titles))
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.3 * rows),
                             squeeze=False)
    size = image.shape[:2]
    for ax, (m, title) in zip(axes.flat, panels):
        _show(ax, image, None if m is None else heat(m, size, patch), title, cmap)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
