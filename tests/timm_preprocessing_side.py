"""The timm half of tests/test_export_preprocessing.py, run by the timm venv's python (timm
imports torchvision, which loads only beside that venv's torch: see tests/timm_side.py). It
needs timm, transformers, torchvision, safetensors and Pillow, not megavit, and judges
nothing: it writes what the libraries compute.

    python tests/timm_preprocessing_side.py TIMM_DIR HF_DIR VAL_DIR CENTER_JSON OUTPUT
        every image of VAL_DIR/CLASS/* (classes and files sorted, as megavit lists them),
        opened with PIL and converted to RGB, through
        - timm: `create_model('local-dir:TIMM_DIR', pretrained=True)` and its eval
          transform `create_transform(**resolve_data_config(model=m))`
        - transformers: `AutoImageProcessor.from_pretrained(HF_DIR)` (its torchvision
          backend, torchvision being installed here) and `ViTForImageClassification`
        - timm's eval transform for the pretrained_cfg CENTER_JSON (inputs only)
        OUTPUT (safetensors): labels [n]; timm_inputs [n, c, h, w], timm_logits [n, k];
        hf_inputs, hf_logits; center_inputs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file


def images_and_labels(root: Path) -> tuple[list[Image.Image], torch.Tensor]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            labels.append(label)
    return images, torch.tensor(labels)


def main(timm_dir: str, hf_dir: str, val_dir: str, center_json: str, output: str) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config
    from transformers import AutoImageProcessor, ViTForImageClassification

    images, labels = images_and_labels(Path(val_dir))
    out = {"labels": labels}
    model = timm.create_model(f"local-dir:{timm_dir}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=model))
    out["timm_inputs"] = torch.stack([transform(im) for im in images])
    processor = AutoImageProcessor.from_pretrained(hf_dir)
    vit = ViTForImageClassification.from_pretrained(hf_dir).eval()
    out["hf_inputs"] = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out["timm_logits"] = model(out["timm_inputs"])
        out["hf_logits"] = vit(pixel_values=out["hf_inputs"]).logits
    center = create_transform(**resolve_data_config(pretrained_cfg=json.loads(center_json)))
    out["center_inputs"] = torch.stack([center(im) for im in images])
    save_file({k: v.contiguous() for k, v in out.items()}, output,
              metadata={"hf_processor": type(processor).__name__})


if __name__ == "__main__":
    main(*sys.argv[1:])
