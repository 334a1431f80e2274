"""A checkpoint's "preprocessing" section (megavit/data/preprocessing.py) <-> what timm and
transformers read: timm's `pretrained_cfg` in config.json and transformers'
`preprocessor_config.json` (`ViTImageProcessor`, `CLIPImageProcessor`,
`SiglipImageProcessor`), both directions.

What the libraries compute from these values (timm 1.0's documented eval transform,
`create_transform(**resolve_data_config(model=m), is_training=False)`; transformers' image
processors):

    timm          crop_mode "squash": Resize((h, w) / crop_pct), CenterCrop((h, w));
                  "center": Resize(shorter side = min(h, w) / crop_pct), CenterCrop;
                  then ToTensor (/ 255), Normalize(mean, std); `interpolation` by name
    transformers  resize to `size` {"height", "width"} (squashed) or {"shortest_edge"}
                  (aspect kept) with `resample` (PIL's filter number), CenterCrop to
                  `crop_size` if `do_center_crop`, x `rescale_factor` (1/255),
                  (x - image_mean) / image_std; `do_convert_rgb` for RGB models

On PIL images both resize with PIL (timm through torchvision's PIL path, transformers with
its PIL backend), as megavit's readers do, so they give megavit's inputs; transformers'
torchvision backend resizes uint8 tensors, within one grey level of PIL. Greyscale models
(1 channel) take PIL "L" images; neither library converts to them.

An import records a section only when the files say everything megavit needs; otherwise it
records none and says why (tools then assume megavit's own reading).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megavit.config import ModelConfig
from megavit.data.preprocessing import PIL_FILTERS, Preprocessing, PreprocessingError

# timm's resolve_data_config defaults for keys a pretrained_cfg leaves out (timm 1.0)
_TIMM_DEFAULTS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                  "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center"}
_FILTER_NAMES = {code: name for name, code in PIL_FILTERS.items()}


def timm_pretrained_cfg(pre: Preprocessing) -> dict:
    """The preprocessing keys of timm's `pretrained_cfg`."""
    return {"input_size": [pre.channels, pre.height, pre.width], "mean": list(pre.mean),
            "std": list(pre.std), "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct, "crop_mode": pre.crop_mode}


def hf_image_processor(pre: Preprocessing, processor: str) -> dict:
    """preprocessor_config.json for transformers' image processor class `processor`."""
    crop = {"height": pre.height, "width": pre.width}
    if pre.crop_mode == "squash":
        h, w = pre.resized_size(pre.height, pre.width)
        size = {"height": h, "width": w}
    else:
        size = {"shortest_edge": math.floor(min(pre.height, pre.width) / pre.crop_pct)}
    return {"image_processor_type": processor, "do_resize": True, "size": size,
            "resample": PIL_FILTERS[pre.interpolation], "do_center_crop": size != crop,
            "crop_size": crop, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std),
            "do_convert_rgb": pre.channels == 3}


def _per_channel(values, channels: int) -> tuple[float, ...]:
    values = [values] if isinstance(values, (int, float)) else list(values)
    return tuple(float(v) for v in (values * channels if len(values) == 1 else values))


def _crop_pct(crop: int, resized: int) -> float:
    """crop / resized, nudged down where floating point would make floor(crop / pct) fall
    one short of `resized`."""
    pct = crop / resized
    return pct if math.floor(crop / pct) == resized else math.nextafter(pct, 0.0)


def from_timm(config: dict, model: ModelConfig) -> Preprocessing:
    """The preprocessing a timm config.json's `pretrained_cfg` gives `model` (timm's
    defaults for the keys it leaves out)."""
    cfg = {**_TIMM_DEFAULTS, **{k: v for k, v in config["pretrained_cfg"].items()
                                if v is not None}}
    c = model.num_channels
    return Preprocessing(mean=_per_channel(cfg["mean"], c), std=_per_channel(cfg["std"], c),
                         channels=c, height=model.img_h, width=model.img_w,
                         interpolation=cfg["interpolation"], crop_pct=float(cfg["crop_pct"]),
                         crop_mode=cfg["crop_mode"])


def from_hf(processor: dict, model: ModelConfig) -> Preprocessing:
    """The preprocessing a transformers preprocessor_config.json gives `model`;
    PreprocessingError naming what does not fit megavit's description."""
    missing = [k for k in ("size", "resample", "do_rescale", "rescale_factor", "do_normalize")
               if k not in processor]
    if missing:
        raise PreprocessingError(f"no {', '.join(missing)}")
    if not processor.get("do_resize", True) or not processor["do_rescale"] or \
            not math.isclose(processor["rescale_factor"], 1 / 255):
        raise PreprocessingError("images are not resized, or pixels not scaled by 1/255")
    size, c = processor["size"], model.num_channels
    crop = processor.get("crop_size") if processor.get("do_center_crop") else None
    if "height" in size and "width" in size:
        out = (crop["height"], crop["width"]) if crop else (size["height"], size["width"])
        mode, pct = "squash", _crop_pct(out[0], size["height"])
        if math.floor(out[1] / pct) != size["width"]:
            raise PreprocessingError(f"size {size} and crop_size {crop} crop the two sides "
                                     "in different proportions")
    elif "shortest_edge" in size and crop:
        out = (crop["height"], crop["width"])
        mode, pct = "center", _crop_pct(min(out), size["shortest_edge"])
    else:
        raise PreprocessingError(f"size {size} without a centre crop to a fixed size")
    if out != (model.img_h, model.img_w):
        raise PreprocessingError(f"it makes {out[0]}x{out[1]} images, the model takes "
                                 f"{model.img_h}x{model.img_w}")
    normalise = processor["do_normalize"]
    return Preprocessing(
        mean=_per_channel(processor["image_mean"], c) if normalise else (0.0,) * c,
        std=_per_channel(processor["image_std"], c) if normalise else (1.0,) * c,
        channels=c, height=model.img_h, width=model.img_w,
        interpolation=_FILTER_NAMES.get(processor["resample"], str(processor["resample"])),
        crop_pct=pct, crop_mode=mode)


def imported_preprocessing(directory: Path, config: dict, model: ModelConfig
                           ) -> tuple[dict | None, str | None]:
    """(the "preprocessing" section, None) for an imported directory (timm: config.json's
    `pretrained_cfg`; transformers: preprocessor_config.json), or (None, why none is
    recorded)."""
    if "architecture" in config:
        where = f"{directory / 'config.json'} pretrained_cfg"
        if not config.get("pretrained_cfg"):
            return None, f"{directory / 'config.json'} has no pretrained_cfg"
        read = lambda: from_timm(config, model)  # noqa: E731
    else:
        path = directory / "preprocessor_config.json"
        where = str(path)
        if not path.is_file():
            return None, f"{path} missing"
        try:
            processor = json.loads(path.read_text())
        except ValueError as e:
            return None, f"{path}: not JSON ({e})"
        read = lambda: from_hf(processor, model)  # noqa: E731
    try:
        return read().to_dict(), None
    except (PreprocessingError, KeyError, TypeError, ValueError) as e:
        return None, f"{where}: {e}"
