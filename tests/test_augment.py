"""The pretraining recipe (issue 17): per-image augmentation (random-resized crop, flip,
RandAugment), Mixup / CutMix and the sigmoid loss.

- Invariant: the `deit` recipe with `--loss sigmoid` trains the same model as the serial
  run at TP=2 (plain, and with sequence parallelism over 25 tokens + selective
  recomputation), PP=2 (full recomputation) and DP=2; the augmented, mixed batch itself is
  the same at TP=2 and DP=2. One gloo group per layout runs every check.
- Resume: iterations [k, n) read alone are the tail of [0, n).
- Targets: Mixup / CutMix targets sum to 1 per image and mix the partner's label.
- Loss: the sigmoid loss is the binary cross-entropy formula; the softmax loss on soft
  targets the cross-entropy formula; the classifier's bias starts at -log(C).
- Library and fallback: in the timm venv (torchvision 0.29.1) torchvision's transforms and
  megavit's torch implementation draw the same crop boxes and give the same augmented
  images, mixed batches and RandAugment operations (tests/torchvision_side.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megavit.data.augment import PRESETS, BatchMixer, recipe_from_config
from megavit.data.targets import class_targets, label_hits
from megavit.parallel.state import ParallelState, serial_state
from megavit.tasks.classification import classification_loss, classification_run
from tests.harness import run_distributed
from tests.scenarios import debug_config, merge_stages, train_steps
from tests.test_tensor_parallel import assert_two_steps_match

ROOT = Path(__file__).resolve().parents[1]
TIMM_PYTHON = Path(os.environ.get("MEGAVIT_TIMM_PYTHON", ROOT / ".venv-timm/bin/python"))
RTOL = 1e-5
SP_SELECTIVE = {"sequence_parallel": True, "recompute_granularity": "selective"}
PP2_FULL = {"pipeline_model_parallel_size": 2, "recompute_granularity": "full",
            "recompute_method": "uniform", "recompute_num_layers": 1}
# name: (world, tp, pp, [ParallelConfig overrides of the checks run in that group])
LAYOUTS = {"tp2": (2, 2, 1, [{}, SP_SELECTIVE]), "pp2": (2, 1, 2, [PP2_FULL]),
           "dp2": (2, 1, 1, [{}])}


def recipe_config(tp: int = 1, parallel: dict | None = None):
    """vit-debug on digits at 20x20 px (25 tokens), deit recipe, sigmoid loss, global batch
    8 in micro-batches of 2 (4 blocks under pipeline parallelism)."""
    layers = 4 if parallel and parallel.get("pipeline_model_parallel_size") else 2
    cfg = debug_config(tp=tp, parallel=parallel, layers=layers)
    cfg.data = dataclasses.replace(cfg.data, augment="deit", loss="sigmoid")
    return cfg


def write_label_shards(folder: Path, count: int, multi: bool, first: int = 0) -> str:
    """`count` digits (from index `first`) as PNG + .cls shards of 16 samples in `folder`;
    with `multi` every third image also carries the next digit's class. Returns the
    pattern; one member in the middle is corrupt (not a PNG)."""
    import io

    import webdataset as wds
    from PIL import Image

    from megavit.data.datasets import raw_digits

    images, labels = raw_digits()
    folder.mkdir(parents=True)
    shards = -(-count // 16)
    for s in range(shards):
        with open(folder / f"{s:06d}.tar", "wb") as f:
            writer = wds.TarWriter(f, mtime=0)
            for i in range(first + s * 16, first + min(count, (s + 1) * 16)):
                buf = io.BytesIO()
                Image.fromarray(images[i], mode="L").save(buf, format="PNG")
                data = buf.getvalue() if i != first + count // 2 else b"not a png"
                cls = f"{labels[i]}" + (f" {(labels[i] + 1) % 10}" if multi and i % 3 == 0
                                        else "")
                writer.write({"__key__": f"{i:06d}", "png": data, "cls": cls})
            writer.close()
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory) -> tuple[str, str]:
    """(train, held-out) multi-label digit shards: 48 and 16 images."""
    root = tmp_path_factory.mktemp("shards")
    return (write_label_shards(root / "train", 48, multi=True),
            write_label_shards(root / "val", 16, multi=True, first=100))


def shards_config(data: tuple[str, str], tp: int = 1, parallel: dict | None = None):
    """`recipe_config` reading the multi-label shards (sigmoid loss; no loader workers)."""
    cfg = recipe_config(tp, parallel)
    cfg.data = dataclasses.replace(cfg.data, dataset="shards", data_path=data[0],
                                   valid_data_path=data[1], num_workers=0)
    cfg.model = dataclasses.replace(cfg.model, num_classes=10)
    return cfg


def batches(pstate: ParallelState, cfg, start: int = 0, stop: int = 2) -> list[list[dict]]:
    """This rank's micro-batches of iterations [start, stop) as plain tensors."""
    run = classification_run(cfg, pstate)
    return [[{"images": mb.images, "labels": mb.labels, "ids": mb.sample_ids} for mb in step]
            for step in run.batches(start, stop)]


def shard_steps(pstate: ParallelState, cfg) -> dict:
    """Two training steps on the shards, then the held-out evaluation."""
    out = train_steps(pstate, cfg)
    run = classification_run(cfg, pstate)
    out["eval"] = run.evaluate()
    return out


CHECKS = {"steps": train_steps, "batches": batches, "shards": shard_steps}


@functools.lru_cache(maxsize=None)
def serial(check: str, layers: int, data: tuple[str, str] | None = None):
    cfg = recipe_config() if data is None else shards_config(data)
    cfg.model = dataclasses.replace(cfg.model, num_layers=layers)
    return CHECKS[check](serial_state(), cfg)


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, shard_data):
    world, tp, pp, variants = LAYOUTS[request.param]
    jobs = {}
    for i, parallel in enumerate(variants):
        cfg = recipe_config(tp=tp, parallel=parallel)
        jobs[f"steps{i}"] = (train_steps, (cfg,))
        jobs[f"batches{i}"] = (batches, (cfg,))
        jobs[f"shards{i}"] = (shard_steps, (shards_config(shard_data, tp, parallel),))
    return request.param, run_distributed(world, tp, jobs, pp=pp)


@pytest.mark.parametrize("check", ["steps", "shards"])
def test_recipe_trains_as_the_serial_run(layout, shard_data, check):
    """`steps`: the digits in memory; `shards`: multi-label shards with a corrupt member,
    read on the first stage, labels handed down the pipeline."""
    name, results = layout
    world, tp, pp, variants = LAYOUTS[name]
    for i, parallel in enumerate(variants):
        cfg = recipe_config(tp=tp, parallel=parallel)
        ref = serial(check, cfg.model.num_layers, shard_data if check == "shards" else None)
        if check == "shards":
            for rank in results[f"shards{i}"]:
                for key, value in ref["eval"].items():
                    assert rank["eval"][key] == pytest.approx(value, rel=1e-5), (name, key)
        column = world // pp
        for c in range(column):
            got = merge_stages(results[f"{check}{i}"], [k * column + c for k in range(pp)])
            assert_two_steps_match(got, ref, recipe_config(), f"{name}[{i}]", RTOL)


def test_augmented_mixed_batch_is_the_serial_one(layout):
    """Every rank's micro-batches are its slice of the serial ones: images on the ranks
    holding the first pipeline stage (None on the others), mixed targets everywhere."""
    name, results = layout
    world, tp, pp, variants = LAYOUTS[name]
    dp = world // (tp * pp)
    for i, _ in enumerate(variants):
        ref = serial("batches", recipe_config(tp, variants[i]).model.num_layers)
        for r, rank_batches in enumerate(results[f"batches{i}"]):
            stage, dp_rank = r // (world // pp), (r % (world // pp)) // tp
            for step in range(2):
                per_rank = len(ref[step]) // dp
                theirs = ref[step][dp_rank * per_rank:(dp_rank + 1) * per_rank]
                assert len(rank_batches[step]) == len(theirs)
                for a, b in zip(rank_batches[step], theirs):
                    what = f"{name} rank {r} step {step}"
                    assert torch.equal(a["ids"], b["ids"]), what
                    assert torch.equal(a["labels"], b["labels"]), what
                    if stage == 0:
                        assert torch.equal(a["images"], b["images"]), what
                    else:
                        assert a["images"] is None, what


def test_recipe_batches_are_soft_mixed_targets_and_resume_exactly():
    cfg = recipe_config()
    full = serial("batches", 2)
    tail = batches(serial_state(), cfg, 1, 2)
    for a, b in zip(full[1], tail[0]):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
    for step in full:
        for mb in step:
            t = mb["labels"]
            assert t.shape == (2, 10) and t.dtype == torch.float32
            torch.testing.assert_close(t.sum(-1), torch.ones(2))
    # the crop, flip and RandAugment change the images: not the stored digits
    run = classification_run(dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, augment="none")), serial_state())
    plain = next(iter(run.batches(0, 1)))[0].images
    assert not torch.allclose(full[0][0]["images"], plain)


def test_mixup_and_cutmix_targets_mix_the_partner_label():
    recipe = PRESETS["deit"]
    mixer = BatchMixer(recipe, (16, 16), seed=0, backend="torch")
    labels = torch.tensor([0, 1, 2, 3])
    kinds = set()
    for it in range(20):
        mixing = mixer.draw(it, 0)
        kinds.add(mixing.kind)
        images, targets = mixer(torch.randn(4, 1, 16, 16), class_targets(labels, 5), it, 0)
        torch.testing.assert_close(targets.sum(-1), torch.ones(4))
        for i in range(4):    # image i is mixed with image i - 1 (torchvision's roll)
            assert targets[i, labels[i]] == pytest.approx(mixing.lam, abs=1e-6)
            assert targets[i, labels[i - 1]] == pytest.approx(1 - mixing.lam, abs=1e-6)
        if mixing.kind == "cutmix":   # lambda is the share of the image kept
            x1, y1, x2, y2 = mixing.box
            assert mixing.lam == pytest.approx(1 - (x2 - x1) * (y2 - y1) / 256)
    assert kinds == {"mixup", "cutmix"}


def test_sigmoid_and_softmax_losses_are_their_formulas():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    eps = 0.1
    t = F.one_hot(labels, 5).float() * (1 - eps) + eps / 5
    s = torch.sigmoid(logits)
    bce = -(t * s.log() + (1 - t) * (1 - s).log()).sum(-1).mean()
    torch.testing.assert_close(classification_loss("sigmoid", eps)(logits, labels), bce)
    soft = torch.softmax(torch.randn(6, 5, generator=g), -1)       # e.g. mixed targets
    ce = -((soft * (1 - eps) + eps / 5) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(classification_loss("softmax", eps)(logits, soft), ce)
    multi = torch.tensor([[0, 3], [4, -1], [2, -1], [2, 1], [1, -1], [3, 0]])   # multi-label
    hot = class_targets(multi, 5)
    assert hot.sum().item() == 9 and hot[0, 3] == 1 and hot[1, 4] == 1
    s_ml = -(hot * s.log() + (1 - hot) * (1 - s).log()).sum(-1).mean()
    torch.testing.assert_close(classification_loss("sigmoid")(logits, multi), s_ml)
    top1, at1 = label_hits(torch.eye(5)[[3, 4, 2, 1, 0, 3]], multi)
    assert top1.tolist() == [False, True, True, False, False, True]
    assert at1.tolist() == [True, True, True, True, False, True]


def test_sigmoid_head_starts_at_minus_log_classes():
    cfg = recipe_config()
    run = classification_run(cfg, serial_state())
    bias = dict(run.model.named_parameters())["head.bias"]
    torch.testing.assert_close(bias, torch.full((10,), -math.log(10)))


def test_component_flags_override_the_preset():
    cfg = recipe_config()
    data = dataclasses.replace(cfg.data, mixup=0.0, rand_augment_magnitude=5.0, hflip=0.0)
    recipe = recipe_from_config(data, None)
    assert (recipe.mixup, recipe.cutmix, recipe.rand_augment_magnitude, recipe.hflip,
            recipe.label_smoothing) == (0.0, 1.0, 5.0, 0.0, 0.1)
    assert recipe_from_config(data, 0.0).label_smoothing == 0.0
    assert recipe_from_config(dataclasses.replace(data, augment="none"), None) == \
        dataclasses.replace(PRESETS["none"], mixup=0.0, rand_augment_magnitude=5.0)


def test_torchvision_and_the_torch_fallback_agree(tmp_path):
    if not TIMM_PYTHON.is_file():
        pytest.fail(f"{TIMM_PYTHON} missing: `make test` creates the timm venv (torchvision "
                    "loads only beside torch 2.14.1 here); or set MEGAVIT_TIMM_PYTHON")
    report = tmp_path / "report.json"
    proc = subprocess.run([str(TIMM_PYTHON), str(ROOT / "tests/torchvision_side.py"),
                           str(report)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = json.loads(report.read_text())
    assert out["crop_boxes"][0] == out["crop_boxes"][1] == 300
    assert out["images"][0] == out["images"][1] == 120, out["images"]
    assert out["mixing"][0] == out["mixing"][1] == 60, out["mixing"]
    differ, tried, examples = out["operations"]
    assert tried == 1265 and differ == 0, examples   # 5 sizes x (9 x 11 x 2 + 5 x 11)


def test_shards_read_as_the_image_folder_they_were_made_from(tmp_path):
    """tools/make_shards.py --from image-folder: the same images, labels and order, so the
    same training losses; loader workers and a resume in the middle of a shard read the
    same batches."""
    import importlib.util

    from PIL import Image

    from megavit.data.datasets import raw_digits

    images, labels = raw_digits()
    for split, indices in (("train", range(40)), ("val", range(40, 56))):
        for i in indices:
            folder = tmp_path / "folder" / split / f"class{labels[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(folder / f"{i:03d}.png")
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools/make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    for split in ("train", "val"):   # val labelled as train's classes (it lacks some)
        classes = ["--classes", str(tmp_path / "shards/train/classes.txt")] * (split == "val")
        assert make_shards.main(["--from", "image-folder", "--image-folder",
                                 str(tmp_path / "folder" / split), "--output",
                                 str(tmp_path / "shards" / split),
                                 "--samples-per-shard", "16", *classes]) == 0
    assert (tmp_path / "shards/train/classes.txt").read_text().split() == \
        sorted(f"class{d}" for d in set(labels[:40].tolist()))
    base = debug_config(layers=2)
    base.data = dataclasses.replace(base.data, augment="inception", num_workers=0)
    folder = dataclasses.replace(base, data=dataclasses.replace(
        base.data, dataset="image-folder", data_path=str(tmp_path / "folder")))
    shards = dataclasses.replace(base, data=dataclasses.replace(
        base.data, dataset="shards", data_path=str(tmp_path / "shards/train/{000000..000002}.tar"),
        valid_data_path=str(tmp_path / "shards/val/{000000..000000}.tar")))
    a, b = train_steps(serial_state(), folder), train_steps(serial_state(), shards)
    assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert classification_run(folder, serial_state()).evaluate() == \
        classification_run(shards, serial_state()).evaluate()
    # two loader workers, and iterations [1, 3) alone, read what [0, 3) reads in-process
    whole = batches(serial_state(), shards, 0, 3)
    workers = dataclasses.replace(shards, data=dataclasses.replace(shards.data, num_workers=2))
    for got in (batches(serial_state(), workers, 0, 3), [None] + batches(serial_state(),
                                                                        workers, 1, 3)):
        for step in (1, 2):
            for x, y in zip(got[step], whole[step]):
                assert torch.equal(x["images"], y["images"])
                assert torch.equal(x["labels"], y["labels"])


def test_multi_label_shards_name_the_corrupt_member_and_report_precision_at_1(shard_data):
    from megavit.data.bad_samples import DataWarning

    cfg = shards_config(shard_data)
    run = classification_run(cfg, serial_state())
    assert run.task.heldout.multi_label and run.task.heldout.max_labels == 2
    with pytest.warns(DataWarning, match=r"val/000000.tar key 000108: cannot decode the image"):
        result = run.evaluate()
    assert result["eval_images"] == 16
    assert 0.0 <= result["eval_accuracy"] <= result["eval_precision_at_1"] <= 1.0
    strict = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                               fatal_data_errors=True))
    from megavit.data.bad_samples import DataError
    with pytest.raises(DataError, match="key 000108: cannot decode the image"):
        classification_run(strict, serial_state()).evaluate()


def test_eval_crop_and_normalization_are_recorded_and_applied(tmp_path):
    """--crop-pct 0.875 --image-normalization imagenet: held-out files are resized (shorter
    side to size / 0.875), centre-cropped and normalised with ImageNet's statistics (grey:
    their mean), and the checkpoint's preprocessing says so (exports carry it)."""
    from PIL import Image

    from megavit.data.preprocessing import Preprocessing, read_pixels

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for k in range(3):
            folder = tmp_path / split / f"c{k}"
            folder.mkdir(parents=True)
            pixels = torch.randint(0, 256, (30, 24), generator=g, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / "a.png")
    cfg = debug_config(layers=2)
    cfg.data = dataclasses.replace(cfg.data, dataset="image-folder", data_path=str(tmp_path),
                                   crop_pct=0.875, image_normalization="imagenet",
                                   augment="none", num_workers=0)
    run = classification_run(cfg, serial_state())
    pre = Preprocessing.from_dict(run.task.describe()["preprocessing"], "test")
    assert pre.crop_mode == "center" and pre.crop_pct == 0.875
    assert pre.mean == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert pre.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    images, _ = run.task.heldout.get(torch.arange(3))
    expected = pre.normalise(torch.stack([read_pixels(p, pre) for p, _ in
                                          run.task.heldout.files]))
    torch.testing.assert_close(images, expected)
    assert pre.resized_size(30, 24) == (27, 22)   # shorter side 20 / 0.875 -> 22, as Resize(22)


def test_make_shards_from_a_csv_with_a_label_column(tmp_path):
    """--from csv with an image,labels header writes classification shards (several
    classes per row allowed); a row without a label or with a non-numeric one is skipped
    with a warning naming the line."""
    import importlib.util

    from PIL import Image

    from megavit.config import preset_model_config
    from megavit.data.preprocessing import file_preprocessing
    from megavit.data.shards import ShardClassification

    for i in range(4):
        Image.new("L", (6, 6), color=40 * i).save(tmp_path / f"{i}.png")
    (tmp_path / "rows.csv").write_text("image,labels\n0.png,3\n1.png,1 4\n2.png,\n3.png,x\n")
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "tools/make_shards.py")
    make_shards = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_shards)
    with pytest.warns(UserWarning) as caught:
        assert make_shards.main(["--from", "csv", "--csv", str(tmp_path / "rows.csv"),
                                 "--output", str(tmp_path / "out")]) == 0
    messages = [str(w.message) for w in caught]
    assert any("line 4: missing label: skipped" in m for m in messages), messages
    assert any("line 5: label 'x' is not class indices: skipped" in m for m in messages)
    model = preset_model_config("vit-debug", img_h=6, img_w=6, num_channels=1)
    data = ShardClassification(str(tmp_path / "out/{000000..000000}.tar"), model,
                               file_preprocessing(model))
    assert len(data) == 2 and data.multi_label and data.num_classes == 5
    assert data.labels_of(torch.arange(2)).tolist() == [[3, -1], [1, 4]]
