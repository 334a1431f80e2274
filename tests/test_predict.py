"""`python -m megavit.predict` on trained checkpoints: a classifier's top-k classes are the
softmax of the model's output on the preprocessed image; a segmentation checkpoint's PNG
label maps are the argmax of its logits at the image's size; a corrupt or missing image is
named and the others still predicted (exit 2 with --strict); a directory without a
checkpoint and flags that do not fit the checkpoint exit 2 with a message. (The two-tower
case: tests/test_zero_shot.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests import cli
from tests.test_checkpoint_cli import ROOT, pretrain


def predict(*args: str):
    return cli.run([sys.executable, "-m", "megavit.predict", *args], capture_output=True,
                   text=True, timeout=300, cwd=ROOT)


def segment(*args: str):
    return cli.run([sys.executable, "-m", "megavit.segment", "--preset", "vit-debug",
                    "--num-channels", "1", "--img-h", "24", "--img-w", "24", "--patch-dim", "4",
                    "--micro-batch-size", "8", "--global-batch-size", "8", "--eval-iters", "1",
                    "--neck-channels", "8", "--decoder-channels", "8", "--progress-bar", "off",
                    *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Four scikit-learn digits as PNGs (16x16; two of them 24 wide, 32 high) and a
    corrupt file."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("images")
    digits = load_digits()
    for k in range(4):
        pixels = (digits.images[1700 + k] / 16 * 255).astype(np.uint8)
        size = (16, 16) if k < 2 else (24, 32)
        Image.fromarray(pixels).resize(size, Image.BILINEAR).save(root / f"d{k}.png")
    (root / "sub").mkdir()
    (root / "sub" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    save = tmp_path_factory.mktemp("clf") / "ck"
    proc = pretrain("--train-iters", "8", "--save", str(save))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return save


def test_a_classifier_predicts_its_softmax_and_names_the_broken_image(classifier, images,
                                                                      tmp_path):
    from megavit.checkpointing.inference import load_for_inference
    from megavit.data.preprocessing import read_pixels

    out = tmp_path / "p.jsonl"
    proc = predict(str(classifier), "--image-folder", str(images), "--top-k", "3",
                   "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "sub/broken.png: cannot read it" in proc.stderr
    assert "predict | images 4 | unreadable 1" in proc.stdout
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == ["d0.png", "d1.png", "d2.png", "d3.png"]
    loaded = load_for_inference(classifier)
    assert loaded.kind == "classifier" and loaded.class_names == [str(k) for k in range(10)]
    for row in rows:
        x = loaded.preprocessing.normalise(read_pixels(row["image"], loaded.preprocessing)[None])
        with torch.no_grad():
            p = loaded.model(x).softmax(-1)[0]
        values, indices = p.topk(3)
        assert [e["index"] for e in row["top_k"]] == indices.tolist()
        assert [e["class"] for e in row["top_k"]] == [str(i) for i in indices.tolist()]
        assert [e["probability"] for e in row["top_k"]] == pytest.approx(values.tolist(),
                                                                          abs=1e-6)


def test_bad_inputs_are_named(classifier, images, tmp_path):
    strict = predict(str(classifier), "--image-folder", str(images), "--strict")
    assert strict.returncode == 2 and "broken.png: cannot read it" in strict.stderr
    missing = predict(str(classifier), "--images", str(images / "d0.png"),
                      str(tmp_path / "gone.png"))
    assert missing.returncode == 0 and "gone.png: no such file; left out" in missing.stderr
    assert "predict | images 1 | unreadable 1" in missing.stdout
    none = predict(str(classifier), "--images", str(tmp_path / "gone.png"))
    assert none.returncode == 2 and "none of the 1 images could be read" in none.stderr
    (tmp_path / "not_a_ckpt").mkdir()
    (tmp_path / "not_a_ckpt" / "x.txt").write_text("x")
    other = predict(str(tmp_path / "not_a_ckpt"), "--images", str(images / "d0.png"))
    assert other.returncode == 2 and "neither a checkpoint" in other.stderr
    labels = predict(str(classifier), "--images", str(images / "d0.png"), "--labels", "a")
    assert labels.returncode == 2 and "--labels: a classifier checkpoint" in labels.stderr
    assert "Traceback" not in strict.stderr + other.stderr + labels.stderr


def test_a_segmentation_checkpoint_writes_label_maps_at_the_image_size(images, tmp_path):
    from PIL import Image

    from megavit.checkpointing.inference import load_for_inference
    from megavit.data.preprocessing import read_pixels

    save = tmp_path / "seg"
    trained = segment("--train-iters", "2", "--save", str(save))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    maps, out = tmp_path / "maps", tmp_path / "p.jsonl"
    proc = predict(str(save), "--images", str(images / "d0.png"), str(images / "d3.png"),
                   "--output-dir", str(maps), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    loaded = load_for_inference(save)
    assert loaded.kind == "segmentation" and len(loaded.class_names) == 11
    for row, name, size in zip(map(json.loads, out.read_text().splitlines()),
                               ("d0", "d3"), ((16, 16), (32, 24))):
        written = np.array(Image.open(maps / f"{name}.png"))
        assert written.shape == size and row["size"] == list(size)
        x = loaded.preprocessing.normalise(read_pixels(row["image"], loaded.preprocessing)[None])
        with torch.no_grad():
            logits = F.interpolate(loaded.model(x), size=size, mode="bilinear",
                                   align_corners=False)
        assert np.array_equal(written, logits[0].argmax(0).byte().numpy())
        assert sum(c["pixel_share"] for c in row["classes"]) == pytest.approx(1, abs=1e-5)
    no_dir = predict(str(save), "--images", str(images / "d0.png"))
    assert no_dir.returncode == 2 and "give --output-dir" in no_dir.stderr


def test_another_resolution_resizes_the_positions_and_refuses_what_does_not_fit(classifier,
                                                                              images, tmp_path):
    from megavit.checkpointing.inference import at_resolution, load_for_inference
    from megavit.data.preprocessing import read_pixels
    from megavit.models.vit import resize_pos_embed

    loaded = load_for_inference(classifier)
    big = at_resolution(loaded, 32, 24)
    cfg = big.model_config
    assert (cfg.img_h, cfg.img_w) == (32, 24) and (big.preprocessing.height,
                                                   big.preprocessing.width) == (32, 24)
    if loaded.model_config.position_embedding_type == "learned":
        want = resize_pos_embed(loaded.model.pos_embed.weight.detach(),
                                loaded.model_config.grid, cfg.grid)
        torch.testing.assert_close(big.model.pos_embed.weight.detach(), want)
    out = tmp_path / "p.jsonl"
    proc = predict(str(classifier), "--images", str(images / "d2.png"), "--img-h", "32",
                   "--img-w", "24", "--top-k", "1", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    x = big.preprocessing.normalise(read_pixels(images / "d2.png", big.preprocessing)[None])
    with torch.no_grad():
        p = big.model(x).softmax(-1)[0]
    row = json.loads(out.read_text())
    assert row["top_k"][0]["index"] == int(p.argmax())
    assert row["top_k"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)
    bad = predict(str(classifier), "--images", str(images / "d2.png"), "--img-h", "18",
                  "--img-w", "18")
    assert bad.returncode == 2 and "--img-h 18 --img-w 18: image 18x18" in bad.stderr
