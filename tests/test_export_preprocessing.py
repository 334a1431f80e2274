"""Exports predict like the model (issue 16): a checkpoint records the preprocessing its
training images had, and the exports carry it, so the libraries' own standard pipelines give
the model the inputs megavit gave it.

One image folder of real pictures — scikit-learn's handwritten digits 0-3 as colour PNGs of
40x24 pixels, so resizing and cropping matter — trains a parallel-block ViT (exported to
timm) and a sequential one (exported to transformers) for a few iterations each. Then:
- timm's `create_transform(**resolve_data_config(model=m))` (tests/timm_preprocessing_side.py,
  in the timm venv) and transformers' `AutoImageProcessor` (PIL backend here, torchvision
  backend in the timm venv) give megavit's inputs, and the exported models get the eval
  accuracy the run logged;
- importing the exports records the same preprocessing; a checkpoint written before the
  section existed still exports (assuming megavit's image-file reading, with a warning) and
  still resumes;
- digits written as PNGs and read with the recorded preprocessing are the training inputs
  (what tools/zero_shot.py --image-folder now does).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from megavit.config import ModelConfig
from megavit.data.datasets import ImageFolderDataset
from megavit.data.preprocessing import Preprocessing, checkpoint_preprocessing
from tests import cli
from tests.test_checkpoint_cli import ROOT

TIMM_PYTHON = Path(os.environ.get("MEGAVIT_TIMM_PYTHON", Path(ROOT) / ".venv-timm/bin/python"))
CLASSES = 4
TRAIN = ["--dataset", "image-folder", "--img-h", "8", "--img-w", "8", "--num-channels", "3",
         "--patch-dim", "2", "--num-layers", "2", "--hidden-size", "32",
         "--num-attention-heads", "4", "--ffn-hidden-size", "64", "--micro-batch-size", "32",
         "--global-batch-size", "32", "--lr", "1e-2", "--lr-warmup-iters", "10",
         "--clip-grad", "1.0", "--train-iters", "80", "--num-workers", "0",
         "--progress-bar", "off"]
MODELS = {"timm": ["--block-type", "parallel", "--pooling", "map"],
          "transformers": ["--block-type", "sequential", "--pooling", "cls", "--add-qkv-bias",
                           "--add-proj-bias", "--norm-bias", "--no-qk-layernorm"]}
# timm's usual ImageNet evaluation settings, to check megavit's reader in "center" mode
CENTER = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), channels=3,
                       height=8, width=8, interpolation="bicubic", crop_pct=0.875,
                       crop_mode="center")


def _digit_folder(root: Path) -> Path:
    """root/{train,val}/digitK/*.png: the digits 0..CLASSES-1, every fifth one held out, as
    40x24 RGB pictures (each 8x8 digit enlarged, ink and paper in different colours)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    kept = np.flatnonzero(digits.target < CLASSES)
    for k, i in enumerate(kept):
        v = digits.images[i] / 16.0
        rgb = (np.stack([v, 0.3 + 0.5 * v, 1.0 - v], -1) * 255).round().astype(np.uint8)
        folder = root / ("val" if k % 5 == 0 else "train") / f"digit{digits.target[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).resize((40, 24), Image.NEAREST).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Iterator[dict]:
    """The folder, and per format: the checkpoint, its export and the logged eval result;
    the timm side, started on the exports."""
    from megavit.checkpointing.checkpointer import resolve_checkpoint
    from megavit.interop.export_hf import export_checkpoint

    base = tmp_path_factory.mktemp("preprocessing")
    folder = _digit_folder(base / "digits")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {fmt: cli.start(
        [sys.executable, "-m", "megavit.pretrain", *TRAIN, *flags, "--data-path", str(folder),
         "--save", str(base / fmt / "ck"), "--metrics-file", str(base / fmt / "m.jsonl")],
        cwd=ROOT, env=env, timeout=300)
        for fmt, flags in MODELS.items()}   # both at once: two cores
    out = {"folder": folder}
    for fmt, started in procs.items():
        proc = started.wait()
        assert proc.returncode == 0, proc.stdout + proc.stderr
        logged = [json.loads(x) for x in (base / fmt / "m.jsonl").read_text().splitlines()]
        final = [r for r in logged if r["kind"] == "eval"][-1]
        checkpoint = resolve_checkpoint(base / fmt / "ck")
        export_checkpoint(checkpoint, fmt, base / fmt / "export", None, 1 << 20,
                          report=lambda line: None)
        out[fmt] = {"checkpoint": checkpoint, "export": base / fmt / "export",
                    "correct": round(final["eval_accuracy"] * final["eval_images"]),
                    "images": final["eval_images"]}
    out["timm_side"] = _start_timm_side(out, base / "timm.safetensors")  # runs meanwhile
    yield out
    if out["timm_side"] is not None and out["timm_side"].poll() is None:
        out["timm_side"].kill()


def _start_timm_side(runs: dict, output: Path) -> subprocess.Popen | None:
    """tests/timm_preprocessing_side.py on the exports (None without the timm venv)."""
    from megavit.interop.preprocessor_configs import timm_pretrained_cfg

    if not TIMM_PYTHON.is_file():
        return None
    return subprocess.Popen(
        [str(TIMM_PYTHON), str(ROOT / "tests" / "timm_preprocessing_side.py"),
         str(runs["timm"]["export"]), str(runs["transformers"]["export"]),
         str(runs["folder"] / "val"), json.dumps(timm_pretrained_cfg(CENTER)), str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _megavit_inputs(runs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out images [n, 3, 8, 8] and labels [n] as the run evaluated them."""
    from megavit.checkpointing.offline import read_config

    info, cfg = read_config(runs["timm"]["checkpoint"])
    pre, note = checkpoint_preprocessing(info, cfg, "megavit_config.json")
    assert note is None and pre.mean == (0.5,) * 3
    val = runs["folder"] / "val"
    data = ImageFolderDataset(val, sorted(p.name for p in val.iterdir()), cfg, "val", pre)
    return data.get(torch.arange(len(data)))


def _correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(-1) == labels).sum())


def test_exports_predict_through_the_transformers_image_processor_as_the_run_logged(runs):
    from transformers import AutoImageProcessor, ViTForImageClassification
    from PIL import Image

    export = runs["transformers"]["export"]
    processor = AutoImageProcessor.from_pretrained(export, backend="pil")
    model = ViTForImageClassification.from_pretrained(export).eval()
    val = runs["folder"] / "val"
    paths = [p for c in sorted(val.iterdir()) for p in sorted(c.iterdir())]
    images = []
    for path in paths:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    ours, labels = _megavit_inputs(runs)
    torch.testing.assert_close(pixels, ours, rtol=0, atol=1e-6)
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
    assert _correct(logits, labels) == runs["transformers"]["correct"]
    assert runs["transformers"]["correct"] > 2 * runs["transformers"]["images"] / CLASSES


def test_imports_record_the_exported_preprocessing(runs, tmp_path):
    from megavit.checkpointing.offline import read_config
    from megavit.interop.import_hf import import_directory

    for fmt in MODELS:
        recorded, _ = read_config(runs[fmt]["checkpoint"])
        path, _ = import_directory(runs[fmt]["export"], tmp_path / fmt, report=lambda s: None)
        imported, _ = read_config(path)
        assert imported["preprocessing"] == recorded["preprocessing"], fmt


def test_a_checkpoint_without_the_section_exports_and_resumes(runs, tmp_path):
    from megavit.checkpointing.checkpointer import (CONFIG_FILE, check_model_config,
                                                    preprocessing_change)
    from megavit.interop.export_hf import export_checkpoint

    old = tmp_path / "old"
    shutil.copytree(runs["timm"]["checkpoint"], old)
    info = json.loads((old / CONFIG_FILE).read_text())
    current = dict(info)
    del info["preprocessing"]
    (old / CONFIG_FILE).write_text(json.dumps(info))
    lines = []
    export_checkpoint(old, "timm", tmp_path / "export", None, 1 << 20, report=lines.append)
    assert any("export | warning: " in x and "records no preprocessing" in x for x in lines)
    pretrained = json.loads((tmp_path / "export" / "config.json").read_text())["pretrained_cfg"]
    assert pretrained["mean"] == [0.5] * 3 and pretrained["interpolation"] == "bilinear"

    class Run:      # what resume compares: this run's description
        def describe(self) -> dict:
            return current

    check_model_config(old, Run())                 # not "a different model"
    assert preprocessing_change(info, current) is None
    other = {**current, "preprocessing": {**current["preprocessing"], "std": [0.25] * 3}}
    assert "0.25" in preprocessing_change(current, other)


def test_digit_pngs_read_with_the_recorded_preprocessing_are_the_training_inputs(tmp_path):
    """The zero-shot tool's --image-folder case: a model trained on the embedded digits."""
    from PIL import Image

    from megavit.data.datasets import load_digits
    from megavit.data.preprocessing import default_preprocessing

    cfg = ModelConfig(img_h=8, img_w=8, num_channels=1)
    held = load_digits(cfg)[1]
    pre = held.preprocessing
    pixels = held.images[:40] * torch.tensor(pre.std) + torch.tensor(pre.mean)   # in [0, 1]
    for i, image in enumerate(pixels):
        (tmp_path / "d" / "all").mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).round().byte().numpy()).save(
            tmp_path / "d" / "all" / f"{i:02d}.png")
    read = ImageFolderDataset(tmp_path / "d", ["all"], cfg, "d", pre).get(torch.arange(40))[0]
    torch.testing.assert_close(read, held.images[:40], rtol=0, atol=0.5 / 255 / pre.std[0] + 1e-5)
    wrong = ImageFolderDataset(tmp_path / "d", ["all"], cfg, "d", default_preprocessing(cfg))
    assert (wrong.get(torch.arange(40))[0] - held.images[:40]).abs().max() > 0.1


def test_exports_predict_through_timm_transforms_as_the_run_logged(runs):
    """Last in the file: the timm side has run meanwhile."""
    side = runs["timm_side"]
    if side is None:
        pytest.fail(f"{TIMM_PYTHON} missing: `make test` creates the timm venv; or set "
                    "MEGAVIT_TIMM_PYTHON")
    from safetensors import safe_open
    from safetensors.torch import load_file

    log = side.communicate(timeout=300)[0]
    assert side.returncode == 0, log
    output = side.args[-1]
    theirs = load_file(output)
    ours, labels = _megavit_inputs(runs)
    assert torch.equal(theirs["labels"], labels)
    torch.testing.assert_close(theirs["timm_inputs"], ours, rtol=0, atol=1e-6)
    assert _correct(theirs["timm_logits"], labels) == runs["timm"]["correct"]
    # transformers' torchvision backend resizes uint8 tensors: within one grey level of PIL
    with safe_open(output, "pt") as f:
        processor = f.metadata()["hf_processor"]
    assert (theirs["hf_inputs"] - ours).abs().max() <= 1 / 255 / 0.5 + 1e-6, processor
    assert abs(_correct(theirs["hf_logits"], labels) - runs["transformers"]["correct"]) <= 1
    # megavit's reader in timm's "center" mode (bicubic, crop_pct 0.875) is timm's transform
    val = runs["folder"] / "val"
    center = ImageFolderDataset(val, sorted(p.name for p in val.iterdir()),
                                ModelConfig(img_h=8, img_w=8, num_channels=3), "val", CENTER)
    torch.testing.assert_close(theirs["center_inputs"], center.get(torch.arange(len(center)))[0],
                               rtol=0, atol=1e-5)
