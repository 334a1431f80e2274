"""Label-map datasets for semantic segmentation (`megavit.segment`).

A segmentation set yields images [n, c, H, W] (normalised, as the classification sets) and
label maps [n, H, W] int64: a class per pixel, `ignore_index` where a pixel counts in
neither loss nor metric.

    train, heldout = build_segmentation_datasets(data, model)   # --dataset mnist-seg
    images, maps = train.compose(indices, draws)                # draws: global sample ids
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megavit.config import DataConfig, ModelConfig
from megavit.data.bad_samples import DataError
from megavit.data.datasets import _IMAGE_SUFFIXES, raw_mnist5k, split_indices
from megavit.data.preprocessing import Preprocessing, file_preprocessing, read_pixels

_SEED = 20261207


class MnistSeg:
    """`--dataset mnist-seg`: MNIST-5k digits composed on a black --img-h x --img-w canvas,
    every stroke pixel labelled with its digit's class + 1, background 0 (11 classes).

    The rule, per canvas: a generator seeded by (split, key) draws 1 + DIGITS_MORE (0, 1 or
    2 more, uniformly) digits: the first is sample i itself, the others uniformly from the
    same split. Each is resized (bilinear) to a random side in [MIN_SIDE, MAX_SIDE] px
    (clipped to the canvas) and placed uniformly at random fully inside the canvas, in
    order, each over the previous: the image is the pixel-wise maximum, and a pixel whose
    resized stroke value is at least STROKE (0.5) takes that digit's label (the later digit
    wins where strokes cross). The held-out split's key is the index i: the same canvases in
    every run. The training split's key is the draw's global sample id (iteration x global
    batch + position), so every draw of a digit composes a fresh canvas, the same at every
    layout: this is the set's augmentation. The split is MNIST-5k's fixed train / held-out
    split; images are normalised with the mean and std of the first 256 held-out canvases.
    """

    in_memory = True
    num_classes = 11
    MIN_SIDE, MAX_SIDE, STROKE = 20, 40, 0.5
    DIGITS_MORE = 2

    def __init__(self, name: str, digits: np.ndarray, labels: np.ndarray, split: str,
                 model: ModelConfig, stats: tuple[float, float] | None = None) -> None:
        if model.img_h < self.MIN_SIDE or model.img_w < self.MIN_SIDE:
            raise DataError(f"--dataset mnist-seg places digits of at least {self.MIN_SIDE} "
                            f"px: --img-h/--img-w must be at least {self.MIN_SIDE} (got "
                            f"{model.img_h}x{model.img_w})")
        self.name, self.split, self.model = name, split, model
        self.digits = torch.from_numpy(digits.astype(np.float32) / 255.0)   # [n, 28, 28]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        if stats is None:
            sample = self.canvases(torch.arange(min(256, len(self))))[0]
            stats = (sample.mean().item(), sample.std().item())
        self.stats = stats
        c = model.num_channels
        self.preprocessing = Preprocessing(mean=(stats[0],) * c, std=(stats[1],) * c,
                                           channels=c, height=model.img_h, width=model.img_w)
        self.class_names = ["background"] + [str(d) for d in range(10)]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def canvas(self, i: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Canvas [H, W] in [0, 1] and label map [H, W] of sample i composed under `key`."""
        H, W = self.model.img_h, self.model.img_w
        g = torch.Generator().manual_seed(_SEED + (2 * key if self.split == "train"
                                                   else 2 * key + 1))
        image, labels = torch.zeros(H, W), torch.zeros(H, W, dtype=torch.long)
        more = int(torch.randint(self.DIGITS_MORE + 1, (1,), generator=g))
        others = torch.randint(len(self), (more,), generator=g).tolist()
        for j in [i, *others]:
            side = int(torch.randint(self.MIN_SIDE, self.MAX_SIDE + 1, (1,), generator=g))
            side = min(side, H, W)
            y = int(torch.randint(H - side + 1, (1,), generator=g))
            x = int(torch.randint(W - side + 1, (1,), generator=g))
            digit = F.interpolate(self.digits[j][None, None], size=(side, side),
                                  mode="bilinear", align_corners=False)[0, 0].clamp_(0, 1)
            window = image[y:y + side, x:x + side]
            torch.maximum(window, digit, out=window)
            labels[y:y + side, x:x + side][digit >= self.STROKE] = int(self.labels[j]) + 1
        return image, labels

    def canvases(self, indices: torch.Tensor, keys: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels [n, c, H, W] in [0, 1] and label maps [n, H, W] of samples `indices`
        composed under `keys` (default: the indices themselves)."""
        keys = indices if keys is None else keys
        c, H, W = self.model.num_channels, self.model.img_h, self.model.img_w
        if len(indices) == 0:
            return torch.empty(0, c, H, W), torch.empty(0, H, W, dtype=torch.long)
        pairs = [self.canvas(int(i), int(k)) for i, k in zip(indices, keys)]
        images = torch.stack([p[0] for p in pairs]).unsqueeze(1).expand(-1, c, -1, -1)
        return images.contiguous(), torch.stack([p[1] for p in pairs])

    def compose(self, indices: torch.Tensor, keys: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs [n, c, H, W] and label maps [n, H, W] (see `canvases`)."""
        pixels, maps = self.canvases(indices, keys)
        return self.preprocessing.normalise(pixels), maps

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compose(indices)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.canvases(indices)[1]


class SegmentationFolder:
    """`--dataset seg-folder`: image files and PNG label maps of the same stem (ADE20K's
    layout): DATA_PATH/images/SPLIT/STEM.jpg|png|... and DATA_PATH/annotations/SPLIT/STEM.png,
    SPLIT `train` / `val` (or ADE20K's `training` / `validation`). A label map holds one
    class id per pixel (greyscale or palette PNG, values 0..K-1, or --ignore-index), at the
    image's size. Images are squashed to --img-h x --img-w (bilinear, as image folders are
    read), label maps the same way with nearest-neighbour sampling. Every image must have
    its map: a missing one is named at start-up; a map of another size, a value that is no
    class, or a file that does not decode stops the run naming the file."""

    in_memory = False

    def __init__(self, name: str, images: list[Path], maps: list[Path], model: ModelConfig,
                 num_classes: int, ignore_index: int, normalization: str) -> None:
        self.name, self.images, self.maps, self.model = name, images, maps, model
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.preprocessing = file_preprocessing(model, normalization)
        self.class_names = [str(k) for k in range(num_classes)]

    def __len__(self) -> int:
        return len(self.images)

    def _read(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image, label = self.images[k], self.maps[k]
        try:
            pixels = read_pixels(image, self.preprocessing)
            with Image.open(image) as im:
                size = im.size
            with Image.open(label) as lm:
                if lm.size != size:
                    raise DataError(f"{label}: label map of {lm.size[0]}x{lm.size[1]} px for "
                                    f"the {size[0]}x{size[1]} px image {image}")
                if lm.mode not in ("L", "P", "I", "I;16"):
                    raise DataError(f"{label}: a label map must be a greyscale or palette PNG "
                                    f"of class ids (mode {lm.mode})")
                lm = lm.resize((self.model.img_w, self.model.img_h), Image.Resampling.NEAREST)
                labels = torch.from_numpy(np.array(lm, dtype=np.int64))
        except DataError:
            raise
        except Exception as e:   # what PIL raises for a file it cannot read
            raise DataError(f"{image} / {label}: cannot read ({type(e).__name__}: {e})") from None
        bad = (labels >= self.num_classes) & (labels != self.ignore_index)
        if bad.any():
            raise DataError(f"{label}: value {int(labels[bad][0])} is no class of --num-classes "
                            f"{self.num_classes} (0..{self.num_classes - 1}) nor --ignore-index "
                            f"{self.ignore_index}")
        return pixels, labels

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, H, W = self.model.num_channels, self.model.img_h, self.model.img_w
        if len(indices) == 0:
            return torch.empty(0, c, H, W), torch.empty(0, H, W, dtype=torch.long)
        pairs = [self._read(int(i)) for i in indices]
        pixels = torch.stack([p[0] for p in pairs])
        return self.preprocessing.normalise(pixels), torch.stack([p[1] for p in pairs])

    def compose(self, indices: torch.Tensor, keys: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `get` (files have no per-draw composition; `keys` are not used)."""
        return self.get(indices)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.get(indices)[1]


def _split_dir(base: Path, names: tuple[str, ...], where: str) -> Path:
    for name in names:
        if (base / name).is_dir():
            return base / name
    raise DataError(f"{where}: missing {base.name}/{names[0]}/ (expected images/ and "
                    "annotations/, each with train/ and val/ or training/ and validation/)")


def segmentation_folder(root: str, model: ModelConfig, num_classes: int, ignore_index: int,
                        normalization: str) -> tuple[SegmentationFolder, SegmentationFolder]:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("--dataset seg-folder needs Pillow: pip install pillow") from None
    base = Path(os.path.expanduser(root))
    if not base.is_dir():
        raise DataError(f"--data-path {root}: no such directory")
    out = []
    for split, names in (("train", ("train", "training")), ("val", ("val", "validation"))):
        image_dir = _split_dir(base / "images", names, f"--data-path {root}")
        map_dir = _split_dir(base / "annotations", names, f"--data-path {root}")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"{image_dir}: no image files")
        maps = [map_dir / f"{p.stem}.png" for p in images]
        missing = [m.name for m in maps if not m.is_file()]
        if missing:
            raise DataError(f"{map_dir}: no label map for {len(missing)} of {len(images)} "
                            f"images ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
                            "; a map is the image's stem + .png)")
        out.append(SegmentationFolder(f"{base.name}-{split}", images, maps, model, num_classes,
                                      ignore_index, normalization))
    return out[0], out[1]


def build_segmentation_datasets(data: DataConfig, model: ModelConfig,
                                num_classes: int | None = None, ignore_index: int = 255):
    """(train, held-out) for a segmentation --dataset (`num_classes`: --num-classes, which
    image folders need)."""
    if data.dataset == "seg-folder":
        if not num_classes:
            raise DataError("--dataset seg-folder needs --num-classes (label values "
                            "0..K-1)")
        return segmentation_folder(str(data.data_path), model, num_classes, ignore_index,
                                   data.image_normalization)
    if data.dataset != "mnist-seg":
        raise DataError(f"--dataset {data.dataset} has no label maps; segmentation reads "
                        "--dataset mnist-seg or seg-folder")
    images, labels = raw_mnist5k()
    train, held = split_indices(len(labels))
    heldout = MnistSeg("mnist-seg-heldout", images[held.numpy()], labels[held.numpy()],
                       "heldout", model)
    return (MnistSeg("mnist-seg-train", images[train.numpy()], labels[train.numpy()],
                     "train", model, heldout.stats), heldout)
