"""Images per second one loader worker prepares: decode from webdataset shards + the `deit`
recipe (random-resized crop to 224 px, flip, RandAugment 2 ops m9, Mixup / CutMix), megavit
against timm's loader over the same shards, in the same run.

    python benchmarks/data_loader.py                      # main venv; timm in .venv-timm
    python benchmarks/data_loader.py --images 512 --rounds 5

megavit: `ShardClassification.get_augmented` with `ImageAugmenter` and `BatchMixer`, in
this process (= one worker; which path, torchvision or megavit's torch fallback, is printed).
timm: `timm.data.create_loader(..., is_training=True,
auto_augment='rand-m9-mstd0.5-inc1-mmax9', num_workers=0)` (see TIMM_RAND_AUGMENT) over a dataset reading the same tar members with Pillow, then
`timm.data.Mixup(0.8, 1.0, label_smoothing 0.1)` per batch, in the timm venv
($MEGAVIT_TIMM_PYTHON or .venv-timm, built by `make venv-timm`). Rounds alternate between
the two so that machine noise hits both; the table reports medians, and the ratio as the
median of each round's pair (a shared machine's speed drifts between rounds).

The shards: JPEG photos of about 500x375 px cut at random from scikit-learn's two sample
photos (no download). The closing lines estimate how many such workers one GPU needs to
keep a step fed: images per second per GPU = peak x MFU / (training FLOPs per image,
megavit's `vit_flops`), for an H100 (989 TFLOP/s dense bf16) at an assumed 50 % MFU
(an assumption until the layout planner predicts step times).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from megavit.training.peak_flops import cpu_name

ROOT = Path(__file__).resolve().parents[1]
H100_BF16_TFLOPS = 989.0
# DeiT's rand-m9-mstd0.5-inc1 with the noisy magnitude capped at 9: at 10 timm's
# PosterizeIncreasing asks Pillow for 0 bits, which Pillow 11 refuses (ValueError)
TIMM_RAND_AUGMENT = "rand-m9-mstd0.5-inc1-mmax9"
ASSUMED_MFU = 0.5




def write_shards(folder: Path, count: int, per_shard: int = 64) -> str:
    """`count` JPEGs (about 500x375, cut from the sample photos) with .cls labels."""
    import numpy as np
    import webdataset as wds
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    shards = math.ceil(count / per_shard)
    for s in range(shards):
        with open(folder / f"{s:06d}.tar", "wb") as f:
            writer = wds.TarWriter(f, mtime=0)
            for i in range(s * per_shard, min(count, (s + 1) * per_shard)):
                photo = photos[i % len(photos)]
                w, h = int(rng.integers(280, 420)), int(rng.integers(210, 315))
                x, y = int(rng.integers(0, photo.width - w)), int(rng.integers(0, photo.height - h))
                image = photo.crop((x, y, x + w, y + h)).resize((500, 375))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                writer.write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "cls": str(i % 10)})
            writer.close()
    return str(folder / f"{{000000..{shards - 1:06d}}}.tar")


def megavit_round(pattern: str, size: int, batch: int, count: int) -> tuple[float, str]:
    import torch

    from megavit.config import preset_model_config
    from megavit.data.augment import PRESETS, BatchMixer, ImageAugmenter
    from megavit.data.preprocessing import file_preprocessing
    from megavit.data.shards import ShardClassification
    from megavit.data.targets import class_targets

    model = preset_model_config("vit-b", img_h=size, img_w=size, num_channels=3)
    data = ShardClassification(pattern, model, file_preprocessing(model), num_classes=10)
    augmenter = ImageAugmenter(PRESETS["deit"], (size, size), seed=0)
    mixer = BatchMixer(PRESETS["deit"], (size, size), seed=0)
    start = time.perf_counter()
    for b, first in enumerate(range(0, count - batch + 1, batch)):
        ids = torch.arange(first, first + batch)
        images, labels = data.get_augmented(ids, lambda p, k: augmenter(p, int(ids[k])))
        mixer(images, class_targets(labels, 10), 0, b)
    done = (count // batch) * batch
    return done / (time.perf_counter() - start), augmenter.backend


def timm_side(pattern_dir: str, size: int, batch: int, count: int) -> None:
    """(in the timm venv) one round of timm's loader; prints its images per second."""
    import torch
    from PIL import Image
    from timm.data import Mixup, create_loader

    class TarImages(torch.utils.data.Dataset):
        def __init__(self, folder: str) -> None:
            self.items = []
            for shard in sorted(Path(folder).glob("*.tar")):
                with tarfile.open(shard) as tf:
                    members = {m.name: m for m in tf.getmembers()}
                for name, m in members.items():
                    if name.endswith(".jpg"):
                        label = members[name[:-4] + ".cls"]
                        self.items.append((str(shard), m.offset_data, m.size, label.offset_data,
                                           label.size))
            self.transform = None

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            shard, offset, nbytes, label_offset, label_size = self.items[i]
            with open(shard, "rb") as f:
                f.seek(offset)
                image = Image.open(io.BytesIO(f.read(nbytes))).convert("RGB")
                f.seek(label_offset)
                label = int(f.read(label_size))
            return self.transform(image), label

    dataset = TarImages(pattern_dir)
    loader = create_loader(dataset, input_size=(3, size, size), batch_size=batch,
                           is_training=True, auto_augment=TIMM_RAND_AUGMENT, re_prob=0.0,
                           interpolation="bilinear", num_workers=0, use_prefetcher=False)
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10)
    start, seen = time.perf_counter(), 0
    for images, labels in loader:
        if len(labels) < batch:
            break
        mixup(images, labels)
        seen += len(labels)
        if seen >= count:
            break
    print(json.dumps({"images_per_second": seen / (time.perf_counter() - start)}))


def timm_round(python: Path, folder: str, size: int, batch: int, count: int) -> float:
    proc = subprocess.run([str(python), __file__, "--timm-side", folder, "--size", str(size),
                           "--batch-size", str(batch), "--images", str(count)],
                          capture_output=True, text=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"data_loader: the timm side failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["images_per_second"]


def workers_needed(rate: float, size: int) -> list[str]:
    from megavit.config import preset_model_config
    from megavit.models.vit import vit_flops

    lines = []
    for preset in ("vit-b", "vit-22b"):
        cfg = preset_model_config(preset, img_h=size, img_w=size, num_channels=3,
                                  num_classes=1000)
        per_image = vit_flops(cfg, 1, training=True)
        per_gpu = H100_BF16_TFLOPS * 1e12 * ASSUMED_MFU / per_image
        lines.append(f"{preset} at {size} px: {per_image / 1e12:.2f} TFLOP per training image "
                     f"-> {per_gpu:,.0f} images/s per H100 at {ASSUMED_MFU:.0%} MFU -> "
                     f"{math.ceil(per_gpu / rate)} worker(s) of this machine's rate per GPU")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="images per round")
    p.add_argument("--size", type=int, default=224, help="training image size (px)")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (Mixup unit)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each loader, alternating")
    p.add_argument("--timm-side", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timm_side:
        timm_side(args.timm_side, args.size, args.batch_size, args.images)
        return 0
    python = Path(os.environ.get("MEGAVIT_TIMM_PYTHON", ROOT / ".venv-timm/bin/python"))
    if not python.is_file():
        print(f"data_loader: {python} missing: `make venv-timm` builds it", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(1)   # one worker: one core
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp) / "shards", args.images)
        ours, theirs, backend = [], [], ""
        for _ in range(args.rounds):
            rate, backend = megavit_round(pattern, args.size, args.batch_size, args.images)
            ours.append(rate)
            theirs.append(timm_round(python, str(Path(tmp) / "shards"), args.size,
                                     args.batch_size, args.images))
    a, b = statistics.median(ours), statistics.median(theirs)
    ratio = statistics.median(x / y for x, y in zip(ours, theirs))   # paired: drift cancels
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; one worker = one process, one thread")
    print(f"command: python benchmarks/data_loader.py --images {args.images} --size {args.size} "
          f"--batch-size {args.batch_size} --rounds {args.rounds}")
    print("| loader (decode + deit recipe, 224 px, from shards) | images/s per worker |")
    print("|---|---|")
    print(f"| megavit ({backend} path) | {a:.1f} |")
    print(f"| timm {'1.0.31'} create_loader + Mixup | {b:.1f} |")
    print(f"| ratio megavit / timm (median of the {args.rounds} paired rounds; range "
          f"{min(x / y for x, y in zip(ours, theirs)):.2f}-"
          f"{max(x / y for x, y in zip(ours, theirs)):.2f}) | {ratio:.2f}x (target >= 1.0x: "
          f"{'met' if ratio >= 1.0 else 'missed'}) |")
    for line in workers_needed(a, args.size):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
