"""Zero-shot evaluation: the metrics on hand-made embeddings, and tools/zero_shot.py on a
trained two-tower checkpoint — on the digits' held-out split it reproduces the accuracy the
training run logged, and it classifies an image folder whose folders name the classes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from megavit.tasks.image_text.zero_shot import (class_embeddings, prompts_for, retrieval_recall,
                                        zero_shot_correct)
from tests import cli
from tests.test_checkpoint_cli import ROOT, pretrain
from tests.test_contrastive_training import _cli

TOOL = str(ROOT / "tools" / "zero_shot.py")


def test_metrics_on_hand_made_embeddings():
    eye = torch.eye(4)
    assert retrieval_recall(eye, eye) == {"image_to_text_r1": 1.0, "text_to_image_r1": 1.0,
                                          "image_to_text_r5": 1.0, "text_to_image_r5": 1.0}
    # image i is closest to text (i + 1) % 4, its own text second
    texts = F.normalize(eye + 2 * eye.roll(-1, dims=0), dim=-1)
    r = retrieval_recall(eye, texts, ks=(1, 2))
    assert r["image_to_text_r1"] == 0.0 and r["image_to_text_r2"] == 1.0
    prompts = prompts_for(["cat", "dog"], ["a {}", "the {}"])
    assert prompts == [["a cat", "the cat"], ["a dog", "the dog"]]
    table = {"a cat": [1.0, 0.0], "the cat": [0.8, 0.6], "a dog": [0.0, 1.0], "the dog": [0.6, 0.8]}
    classes = class_embeddings(lambda ts: torch.tensor([table[t] for t in ts]), prompts)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(2))
    images = F.normalize(torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.0]]), dim=-1)
    assert zero_shot_correct(images, torch.tensor([0, 1, 1]), classes).item() == 2


def test_zero_shot_tool_on_a_trained_checkpoint(tmp_path):
    from PIL import Image

    from megavit.data.image_text import captioned_digits
    from megavit.config import preset_model_config

    save, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    proc = _cli("--train-iters", "20", "--save", str(save), "--metrics-file", str(metrics),
                "--loss", "clip")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    expected = [r for r in logged if r["kind"] == "eval"][-1]["zero_shot_accuracy"]

    def tool(*args):
        return cli.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                       timeout=300)

    out = tool(str(save), "--dataset", "digits")
    assert out.returncode == 0, out.stderr
    assert f"zero_shot | accuracy {expected:.4f} | images 359 | classes 10" in out.stdout

    heldout = captioned_digits(preset_model_config("vit-debug", num_channels=1), 0, "digits")[1]
    names = ("zero", "one", "two")
    written = 0
    for i in range(60):
        label = int(heldout.labels_of(torch.tensor([i]))[0])
        if label < 3:
            folder = tmp_path / "folder" / names[label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = heldout.get(torch.tensor([i]))[0][0, 0]
            pixels = ((pixels - pixels.min()) / (pixels.max() - pixels.min()) * 255).byte()
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
            written += 1
    out = tool(str(save), "--image-folder", str(tmp_path / "folder"),
               "--templates", "a handwritten digit {}.", "the digit {}")
    assert out.returncode == 0, out.stderr
    assert f"| images {written} | classes 3" in out.stdout

    # megavit.predict on the same folder: its top-1 labels give the tool's accuracy
    accuracy = float(out.stdout.split("zero_shot | accuracy ")[1].split()[0])
    records = tmp_path / "predicted.jsonl"
    predicted = cli.run([sys.executable, "-m", "megavit.predict", str(save), "--image-folder",
                         str(tmp_path / "folder"), "--labels", *names, "--templates",
                         "a handwritten digit {}.", "the digit {}", "--top-k", "3",
                         "--output", str(records)], capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(x) for x in records.read_text().splitlines()]
    assert len(rows) == written
    for row in rows:     # CLIP: a softmax over the three labels
        assert sum(e["probability"] for e in row["top_k"]) == pytest.approx(1, abs=1e-5)
    hits = sum(row["top_k"][0]["label"] == row["image"].split("/")[-2] for row in rows)
    assert round(hits / written, 4) == accuracy
    bad = tool(str(save), "--image-folder", str(tmp_path / "folder"), "--class-names", "a,b")
    assert bad.returncode == 2 and "--class-names gives 2 names for the 3 class folders" \
        in bad.stderr
    vit = tmp_path / "vit"
    assert pretrain("--train-iters", "1", "--save", str(vit)).returncode == 0
    bad = tool(str(vit), "--dataset", "digits")
    assert bad.returncode == 2 and "a ViT checkpoint (megavit.pretrain), not a two-tower" \
        in bad.stderr
