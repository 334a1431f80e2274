"""An image folder of crops from scikit-learn's two sample photos (a temple in China, a
flower): a small real-photo classification set made without downloading anything.

    python tools/make_photo_crops.py data/photo_crops --size 64 --train 400 --val 100

Writes DIR/train/<photo>/*.png and DIR/val/<photo>/*.png, and the two whole photos as
DIR/full/china.jpg and DIR/full/flower.jpg (to look at with tools/attention_maps.py): square
crops of random side (a
quarter to a half of the photo's height) at random places, resized to --size px; the
validation crops come from the right-hand fifth of each photo and the training crops from
the rest, so no pixel is in both splits. Each crop's class is the photo it came from, so a
model trained on them must find what tells the two scenes apart (textures and colours of
the temple and the flower): what tools/attention_maps.py then shows on a photo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def crops(photo: np.ndarray, count: int, size: int, columns: tuple[int, int],
          rng: np.random.Generator) -> list[np.ndarray]:
    """`count` square crops whose columns lie within `columns` (start, stop) of `photo`."""
    from PIL import Image

    height = photo.shape[0]
    start, stop = columns
    out = []
    for _ in range(count):
        side = int(rng.integers(height // 4, height // 2 + 1))
        side = min(side, stop - start)
        y = int(rng.integers(0, height - side + 1))
        x = int(rng.integers(start, stop - side + 1))
        piece = Image.fromarray(photo[y:y + side, x:x + side])
        out.append(np.asarray(piece.resize((size, size), Image.BILINEAR)))
    return out


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="DIR", help="where train/ and val/ go (must not exist)")
    p.add_argument("--size", type=int, default=64, help="crop side in pixels")
    p.add_argument("--train", type=int, default=400, help="training crops per photo")
    p.add_argument("--val", type=int, default=100, help="validation crops per photo")
    p.add_argument("--seed", type=int, default=0, help="the crops' random generator seed")
    args = p.parse_args(argv)
    out = Path(args.output)
    if out.exists():
        print(f"make_photo_crops: error: {out} exists; give a new directory", file=sys.stderr)
        return 2
    if min(args.size, args.train, args.val) < 1:
        print("make_photo_crops: error: --size, --train and --val must be at least 1",
              file=sys.stderr)
        return 2
    from PIL import Image
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    rng = np.random.default_rng(args.seed)
    (out / "full").mkdir(parents=True)
    for name, photo in zip(("china", "flower"), data.images):
        Image.fromarray(photo).save(out / "full" / f"{name}.jpg", quality=95)
        width = photo.shape[1]
        cut = width - width // 5
        for split, count, columns in (("train", args.train, (0, cut)),
                                      ("val", args.val, (cut, width))):
            folder = out / split / name
            folder.mkdir(parents=True)
            for k, crop in enumerate(crops(photo, count, args.size, columns, rng)):
                Image.fromarray(crop).save(folder / f"{k:05d}.png")
    print(f"make_photo_crops | {out} | 2 classes | train {2 * args.train} | val "
          f"{2 * args.val} | {args.size}x{args.size} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
