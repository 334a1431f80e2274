"""Write webdataset .tar shards of (image, caption) samples, for --image-text-path.

    python tools/make_shards.py --from digits --output runs/shards/digits-train
    python tools/make_shards.py --from csv --csv data/pairs.csv --output data/shards \\
        --samples-per-shard 10000

Each sample is KEY.EXT (the image: a CSV row's file bytes as they are, .jpg/.jpeg/.png/.webp;
digits as 8-bit grey PNG) plus KEY.txt (the caption); digits also get KEY.cls (the class).
Shards are OUTPUT/000000.tar, OUTPUT/000001.tar, ..., each written as NAME.tar.tmp and
renamed when complete; the last line prints the brace pattern that reads them all back.

--from digits / mnist5k: the embedded split (--split train or heldout, as
megavit.data.datasets splits it) at native size (8x8 / 28x28); its normalised pixels are
mapped back to [0, 255] by the train split's min and max. Captions are those of iteration
0 for --seed (megavit.data.captions), one fixed caption per image.
--from csv: rows of a .csv / .tsv file read as CsvImageText reads them (same header names,
relative paths against the file's folder); a row without a readable image file, with
another image type, or without a caption is skipped with a warning.

Exit status 2 with a message for a missing or malformed input, when no sample is left, or
for an --output that cannot be written or already holds .tar shards; a run that fails or is
interrupted removes the shards it wrote.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

import torch

from megavit.config import preset_model_config
from megavit.data.datasets import DataError, load_digits, load_mnist5k

_RAW_IMAGE_EXTS = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}


def digit_samples(source: str, split: str, seed: int) -> Iterator[dict]:
    from PIL import Image

    from megavit.data.captions import digit_captions

    side = 8 if source == "digits" else 28
    model = preset_model_config("vit-debug", img_h=side, img_w=side, num_channels=1)
    train, held = (load_digits if source == "digits" else load_mnist5k)(model)
    lo, hi = train.images.min(), train.images.max()
    ds = train if split == "train" else held
    pixels = ((ds.images - lo) / (hi - lo) * 255).round().clamp(0, 255).to(torch.uint8)
    captions = digit_captions(ds.labels, torch.arange(len(ds)), seed, iteration=0)
    for i in range(len(ds)):
        buf = io.BytesIO()
        Image.fromarray(pixels[i, 0].numpy(), mode="L").save(buf, format="PNG")
        yield {"__key__": f"{i:08d}", "png": buf.getvalue(), "txt": captions[i],
               "cls": int(ds.labels[i])}


def csv_samples(path: str) -> Iterator[dict]:
    from megavit.data.image_text import CsvImageText

    rows = CsvImageText(path, preset_model_config("vit-debug"))   # parses and checks the header
    for i in range(len(rows)):
        where = f"{rows.path} line {rows.lines[i]}"
        image = rows.image_path(i)
        ext = _RAW_IMAGE_EXTS.get(image.suffix.lower())
        problem = ("missing caption" if not rows.captions[i] else
                   "missing image path" if not rows.images[i] else
                   f"{image}: not a .jpg/.jpeg/.png/.webp file" if ext is None else None)
        if problem is None:
            try:
                data = image.read_bytes()
            except OSError as e:
                problem = f"cannot read image {image} ({e.strerror})"
        if problem is not None:
            warnings.warn(f"{where}: {problem}: skipped", stacklevel=2)
            continue
        yield {"__key__": f"{i:08d}", ext: data, "txt": rows.captions[i]}


def write_shards(samples: Iterator[dict], output: Path, per_shard: int) -> tuple[int, int]:
    """Write `samples` into OUTPUT/NNNNNN.tar, `per_shard` each (each staged as
    NNNNNN.tar.tmp and renamed when complete). Returns (samples, shards)."""
    import webdataset as wds

    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = shards = nbytes = 0
    samples = iter(samples)
    written: list[Path] = []
    try:
        while (first := next(samples, None)) is not None:
            name = output / f"{shards:06d}.tar"
            tmp = name.with_suffix(".tar.tmp")
            written.append(tmp)
            with open(tmp, "wb") as f:
                writer = wds.TarWriter(f, mtime=0)   # fixed mtime: reproducible shards
                try:
                    for sample in itertools.chain([first],
                                                  itertools.islice(samples, per_shard - 1)):
                        nbytes += writer.write(sample)
                        total += 1
                finally:
                    writer.close()   # before the file closes, also when interrupted
            os.replace(tmp, name)
            written.append(name)
            shards += 1
            print(f"make_shards | shard {name.name} | samples {total} | MiB "
                  f"{nbytes / 2**20:.1f} | {time.perf_counter() - start:.1f} s", flush=True)
    except BaseException:     # a bad input, Ctrl-C: leave no shard of an unfinished set
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return total, shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--from", dest="source", choices=("digits", "mnist5k", "csv"), required=True,
                   help="the embedded captioned digits / MNIST-5k, or a --csv file")
    p.add_argument("--csv", help="with --from csv: a .csv / .tsv file with a header naming the "
                                 "image and caption columns (e.g. image,caption)")
    p.add_argument("--output", required=True, help="folder for NNNNNN.tar shards")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples in each shard")
    p.add_argument("--split", choices=("train", "heldout"), default="train",
                   help="with --from digits / mnist5k: which split")
    p.add_argument("--seed", type=int, default=1234,
                   help="with --from digits / mnist5k: the caption seed (as --seed)")
    args = p.parse_args(argv)

    def fail(message: str) -> int:
        print(f"make_shards: error: {message}", file=sys.stderr)
        return 2

    if args.samples_per_shard < 1:
        return fail(f"--samples-per-shard {args.samples_per_shard}: must be at least 1")
    if args.source == "csv" and not args.csv:
        return fail("--from csv needs --csv FILE")
    if args.source != "csv" and args.csv:
        return fail(f"--csv applies to --from csv (not --from {args.source})")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        return fail(f"--output {output}: exists and is not a folder")
    if output.is_dir() and any(output.glob("*.tar")):
        return fail(f"--output {output}: already holds .tar shards; choose a new folder (new "
                    "shards would mix with them)")
    blocker = output
    while not blocker.exists():
        blocker = blocker.parent
    if not blocker.is_dir():
        return fail(f"--output {output}: {blocker} is a file, so the folder cannot be made")
    created = not output.exists()
    try:
        samples = (csv_samples(args.csv) if args.source == "csv"
                   else digit_samples(args.source, args.split, args.seed))
        total, shards = write_shards(samples, output, args.samples_per_shard)
        if total == 0:
            raise DataError(f"no readable sample in {args.csv} (see the warnings above)")
    except (DataError, OSError, KeyboardInterrupt) as e:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            print("make_shards: interrupted; no shard left", file=sys.stderr)
            return 130
        return fail(str(e) if isinstance(e, DataError)
                    else f"--output {output}: cannot write ({e.strerror})")
    print(f"make_shards | wrote {total} samples in {shards} shards | --image-text-data shards "
          f"--image-text-path '{output}/{{000000..{shards - 1:06d}}}.tar'", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
