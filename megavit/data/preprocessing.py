"""The preprocessing a model was trained with: how an image file becomes the model's input.

The datasets know it (`ImageFolderDataset`, the image-text files and the embedded digits
each carry one); a task's `describe()` records it in a checkpoint's `megavit_config.json`
as the "preprocessing" section; tools that read images apply it, and the exports write it
as timm's `pretrained_cfg` and transformers' `preprocessor_config.json`
(`megavit/interop/preprocessor_configs.py`).

    image file ─ decode ─► RGB (channels 3) or greyscale, PIL's "L" (channels 1), uint8
      ─ resize ─► crop_mode "squash": to (height, width) / crop_pct, the aspect ratio not
                  kept; "center": the shorter side to min(height, width) / crop_pct
      ─ centre crop to height x width (nothing is cut with "squash" and crop_pct 1.0;
        an odd margin is split as torchvision's CenterCrop, and so timm, split it: the
        offset is round(margin / 2), Python's round, halves to even; transformers'
        processors may put the extra pixel on the other side)
      ─ / 255 ─► [c, height, width] in [0, 1] ─ (x - mean) / std ─► the model's input

`interpolation` names a PIL filter (`PIL_FILTERS`); PIL's bilinear and bicubic filters
cover the whole source footprint when shrinking (antialiased, as torch's
`F.interpolate(..., antialias=True)`). megavit's own image files are read as
`file_preprocessing` says: mean = std = 0.5 per channel (inputs in [-1, 1]), bilinear,
squashed to --img-h x --img-w; the embedded digits (8x8 arrays, not files) are normalised
with their training split's mean and std, which their preprocessing records in the units
of pixels / 255.

    pre = file_preprocessing(model_cfg)
    x = pre.normalise(read_pixels(path, pre)[None])      # [1, c, H, W] float32
    info["preprocessing"] = pre.to_dict()
    pre, note = checkpoint_preprocessing(info, model_cfg, "ckpt/megavit_config.json")
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from megavit.config import ModelConfig
from megavit.errors import UserError

# PIL's resampling filters by name, with PIL's numbers (`PIL.Image.Resampling`), which are
# also transformers' `resample` codes in preprocessor_config.json.
PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4,
               "hamming": 5}
CROP_MODES = ("squash", "center")
SECTION = "preprocessing"


class PreprocessingError(UserError, ValueError):
    """Preprocessing settings megavit cannot apply; the message names the file or field."""


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes a model input of shape [channels, height, width] (see the
    module docstring). `mean` and `std` are per channel, in units of the [0, 1] pixel
    range."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int                   # 3: RGB; 1: greyscale (PIL's "L")
    height: int
    width: int
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "squash"

    def __post_init__(self) -> None:
        if problems := self.problems():
            raise PreprocessingError("; ".join(problems))

    def problems(self) -> list[str]:
        """What makes these settings unusable (empty: none)."""
        out = []
        if self.channels < 1:
            out.append(f"channels {self.channels}: must be positive")
        for name in ("mean", "std"):
            if len(getattr(self, name)) != self.channels:
                out.append(f"{name} {list(getattr(self, name))} has "
                           f"{len(getattr(self, name))} values for {self.channels} channels")
        if any(not s > 0 for s in self.std):
            out.append(f"std {list(self.std)}: every value must be positive")
        if self.interpolation not in PIL_FILTERS:
            out.append(f"interpolation {self.interpolation!r}: one of {', '.join(PIL_FILTERS)}")
        if not 0 < self.crop_pct <= 1:
            out.append(f"crop_pct {self.crop_pct}: must be in (0, 1]")
        if self.crop_mode not in CROP_MODES:
            out.append(f"crop_mode {self.crop_mode!r}: one of {', '.join(CROP_MODES)}")
        if self.height < 1 or self.width < 1:
            out.append(f"size {self.height}x{self.width}: must be positive")
        return out

    def to_dict(self) -> dict:
        """The "preprocessing" section of megavit_config.json (JSON types only)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, section: dict, where: str) -> "Preprocessing":
        """From a "preprocessing" section; PreprocessingError naming `where` when it is not
        one this megavit reads."""
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            if unknown := sorted(set(section) - names):
                raise PreprocessingError(f"unknown field(s) {', '.join(unknown)}")
            values = {k: tuple(float(x) for x in v) if k in ("mean", "std") else v
                      for k, v in section.items()}
            return cls(**values)
        except (PreprocessingError, TypeError, ValueError) as e:
            raise PreprocessingError(f"{where}: preprocessing {section}: {e}") from None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of `height` x `width` is resized to before the centre
        crop: "squash" ignores the image's shape; "center" scales its shorter side to
        min(height, width) / crop_pct (torchvision's `Resize(int)`, transformers'
        `shortest_edge`)."""
        if self.crop_mode == "squash":
            return math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct)
        short = math.floor(min(self.height, self.width) / self.crop_pct)
        if height <= width:
            return short, int(short * width / height)
        return int(short * height / width), short

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels [n, c, H, W] in [0, 1] -> the model's inputs [n, c, H, W]."""
        shape = (self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype).view(shape)
        return x.sub(mean).div_(std)

    def normalise_levels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [n, c, H, W] (0..255) -> the model's inputs, in one float pass:
        (x - 255 mean) / (255 std)."""
        shape = (self.channels, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(shape) * 255.0
        return x.float().sub_(mean).div_(std)


def read_pixels(source: str | os.PathLike | BinaryIO, pre: Preprocessing) -> torch.Tensor:
    """An image file (a path or an open binary file) as pixels [c, height, width] float32 in
    [0, 1]: decoded, resized and centre-cropped as `pre` says. Raises what PIL raises for a
    file it cannot decode (the caller names the file)."""
    from PIL import Image

    if pre.channels not in (1, 3):
        raise PreprocessingError(f"{pre.channels} channels: image files are read as RGB (3) "
                                 "or greyscale (1)")
    with Image.open(source) as im:
        im = im.convert("L" if pre.channels == 1 else "RGB")
        h, w = pre.resized_size(im.height, im.width)
        im = im.resize((w, h), Image.Resampling(PIL_FILTERS[pre.interpolation]))
        if (h, w) != (pre.height, pre.width):
            top, left = int(round((h - pre.height) / 2)), int(round((w - pre.width) / 2))
            im = im.crop((left, top, left + pre.width, top + pre.height))
        arr = np.asarray(im, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr.copy())
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)


def read_native(source: str | os.PathLike | BinaryIO, channels: int) -> torch.Tensor:
    """An image file as pixels [channels, h, w] uint8 at its own size (RGB or greyscale):
    what a training augmentation crops and resizes."""
    from PIL import Image

    if channels not in (1, 3):
        raise PreprocessingError(f"{channels} channels: image files are read as RGB (3) "
                                 "or greyscale (1)")
    mode = "L" if channels == 1 else "RGB"
    with Image.open(source) as im:
        arr = np.array(im if im.mode == mode else im.convert(mode), dtype=np.uint8)
    x = torch.from_numpy(arr)
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)


def default_preprocessing(model: ModelConfig) -> Preprocessing:
    """megavit's image-file settings for `model`: mean = std = 0.5 per channel (inputs in
    [-1, 1]), bilinear, squashed to --img-h x --img-w. What tools and exports assume for a
    checkpoint that records no preprocessing."""
    c = model.num_channels
    return Preprocessing(mean=(0.5,) * c, std=(0.5,) * c, channels=c, height=model.img_h,
                         width=model.img_w)


# --image-normalization: per-channel (mean, std) of RGB images in [0, 1] units; greyscale
# images take the mean of the three
NORMALIZATIONS = {
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),                       # inputs in [-1, 1]
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),       # timm's default
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


def file_preprocessing(model: ModelConfig, normalization: str = "half") -> Preprocessing:
    """How megavit reads image files for `model` (image folders, CSV, shards):
    `default_preprocessing`, for RGB or greyscale models, with `normalization`'s mean and
    std (NORMALIZATIONS)."""
    if model.num_channels not in (1, 3):
        raise PreprocessingError(f"--num-channels {model.num_channels}: image files are read "
                                 "as RGB or greyscale; set --num-channels to 1 or 3")
    pre = default_preprocessing(model)
    if normalization == "half":
        return pre
    mean, std = NORMALIZATIONS[normalization]
    if model.num_channels == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    return dataclasses.replace(pre, mean=mean, std=std)


def eval_preprocessing(model: ModelConfig, crop_pct: float | None,
                       normalization: str = "half") -> Preprocessing:
    """How held-out image files are read: `file_preprocessing`, or with `crop_pct` the
    shorter side resized to size / crop_pct and the centre cropped (timm's eval transform)."""
    pre = file_preprocessing(model, normalization)
    if crop_pct is None:
        return pre
    return dataclasses.replace(pre, crop_pct=crop_pct, crop_mode="center")


def checkpoint_preprocessing(info: dict, model: ModelConfig, where: str
                             ) -> tuple[Preprocessing, str | None]:
    """The preprocessing a checkpoint's (or export's) description `info` records for its
    image model `model`, and None; for one written before megavit recorded it,
    `default_preprocessing(model)` and a note saying what is assumed. PreprocessingError
    naming `where` when the section is unusable or does not fit the model."""
    if SECTION not in info:
        return default_preprocessing(model), (
            f"{where} records no preprocessing (written before megavit recorded it); "
            "assuming megavit's image-file reading: mean 0.5, std 0.5, bilinear, squashed to "
            "the model's size (wrong for a model trained on --dataset digits or mnist5k)")
    pre = Preprocessing.from_dict(info[SECTION], where)
    if (pre.channels, pre.height, pre.width) != (model.num_channels, model.img_h, model.img_w):
        raise PreprocessingError(
            f"{where}: preprocessing makes {pre.channels}x{pre.height}x{pre.width} inputs, "
            f"the model takes {model.num_channels}x{model.img_h}x{model.img_w}")
    return pre, None
