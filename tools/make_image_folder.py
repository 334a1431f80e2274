"""Write an embedded dataset as an image folder: PNG files in OUTPUT/train/CLASS/ and
OUTPUT/val/CLASS/, the held-out fifth in val/ exactly as megavit holds it out.

    python tools/make_image_folder.py --dataset digits --output data/digits
    python -m megavit.pretrain --dataset image-folder --data-path data/digits --img-h 8 ...
    python tools/zero_shot.py runs/clip/ckpt --image-folder data/digits/val \\
        --templates "a handwritten digit {}."

Class folders are named by the digits' words (zero ... nine), so zero-shot prompts read
naturally. Images keep their size (digits 8x8, MNIST 28x28), grey, 8-bit. Written into
OUTPUT.partial and renamed, so OUTPUT is complete or absent; an existing OUTPUT is refused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from megavit.data.captions import DIGIT_CLASS_NAMES
from megavit.data.datasets import DataError, raw_digits, raw_mnist5k, split_indices

LOADERS = {"digits": raw_digits, "mnist5k": raw_mnist5k}


def write_image_folder(dataset: str, output: Path) -> dict[str, int]:
    """Write `dataset` as an image folder at `output`; returns the image count per split."""
    from PIL import Image

    images, labels = LOADERS[dataset]()
    train, held = split_indices(len(labels))
    partial = output.with_name(output.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    counts = {}
    try:
        for split, indices in (("train", train), ("val", held)):
            for words, _ in DIGIT_CLASS_NAMES:
                (partial / split / words).mkdir(parents=True)
            for i in indices.tolist():
                folder = partial / split / DIGIT_CLASS_NAMES[int(labels[i])][0]
                Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
            counts[split] = len(indices)
        os.replace(partial, output)
    except OSError as e:     # no permission, disk full
        raise DataError(f"--output {output}: cannot write ({e.strerror})") from None
    finally:                 # also on Ctrl-C: OUTPUT is complete or absent
        shutil.rmtree(partial, ignore_errors=True)
    return counts


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(LOADERS), default="digits",
                   help="the embedded dataset to write (default: digits)")
    p.add_argument("--output", type=Path, required=True, help="the folder to create")
    args = p.parse_args(argv)
    if args.output.exists():
        p.error(f"--output {args.output}: exists; choose a new folder")
    parent = args.output.parent
    existing = next((d for d in (parent, *parent.parents) if d.exists()), None)
    if existing is not None and not existing.is_dir():
        p.error(f"--output {args.output}: {existing} is a file, not a folder")
    try:
        counts = write_image_folder(args.dataset, args.output)
    except DataError as e:
        print(f"make_image_folder: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("make_image_folder: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"make_image_folder | {args.dataset} | train {counts['train']} images | val "
          f"{counts['val']} images | 10 classes | path {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
