"""Write webdataset .tar shards: (image, caption) samples for --image-text-path, (image,
class) samples for `megavit.pretrain --dataset shards`.

    python tools/make_shards.py --from digits --output runs/shards/digits-train
    python tools/make_shards.py --from csv --csv data/pairs.csv --output data/shards \\
        --samples-per-shard 10000
    python tools/make_shards.py --from image-folder --image-folder data/digits/train \\
        --output data/digit-shards/train

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
another image type, or without a caption is skipped with a warning. A header with a
`label` (or `labels`, `class`) column instead of a caption column makes classification
shards: KEY.cls holds the row's class index, or several separated by spaces (multi-label).
--from image-folder: ROOT/CLASS/IMAGE files (.jpg/.jpeg/.png/.webp, bytes as they are),
KEY.cls the class's place among the sorted class folders; OUTPUT/classes.txt lists the
class names in that order.

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
        problem = ("missing caption" if not rows.captions[i] else
                   "missing image path" if not rows.images[i] else None)
        ext, data = _image_member(image, where, problem)
        if data is not None:
            yield {"__key__": f"{i:08d}", ext: data, "txt": rows.captions[i]}


def _image_member(image: Path, where: str, problem: str | None
                  ) -> tuple[str | None, bytes | None]:
    """(extension, bytes) of a row's image file, or (None, None) after a warning naming the
    row when `problem` is set, the type is not .jpg/.jpeg/.png/.webp or it cannot be read."""
    ext = _RAW_IMAGE_EXTS.get(image.suffix.lower())
    if problem is None and ext is None:
        problem = f"{image}: not a .jpg/.jpeg/.png/.webp file"
    if problem is None:
        try:
            return ext, image.read_bytes()
        except OSError as e:
            problem = f"cannot read image {image} ({e.strerror})"
    warnings.warn(f"{where}: {problem}: skipped", stacklevel=3)
    return None, None


LABEL_COLUMNS = ("label", "labels", "class")


def csv_label_samples(path: str) -> Iterator[dict] | None:
    """Classification samples of a .csv / .tsv whose header names a label column (None when
    it names none: an image-text file)."""
    import csv as csv_module

    from megavit.data.image_text import CsvImageText

    p = Path(path)
    kind = {".csv": {"delimiter": ","}, ".tsv": {"delimiter": "\t",
                                                 "quoting": csv_module.QUOTE_NONE}}.get(
        p.suffix.lower())
    if kind is None or not p.is_file():
        return None                       # CsvImageText names the problem
    with open(p, newline="", encoding="utf-8", errors="replace") as f:
        header = [h.strip().lower() for h in next(csv_module.reader(f, **kind), [])]
    label_col = next((header.index(c) for c in LABEL_COLUMNS if c in header), None)
    image_col = next((header.index(c) for c in CsvImageText.IMAGE_COLUMNS if c in header), None)
    if label_col is None:
        return None
    if image_col is None:
        raise DataError(f"{p}: the header row {header} names no image column (one of "
                        f"{', '.join(CsvImageText.IMAGE_COLUMNS)})")

    def samples() -> Iterator[dict]:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv_module.reader(f, **kind)
            next(reader)
            k = 0
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                where = f"{p} line {reader.line_num}"
                cells = [row[c].strip() if c < len(row) else "" for c in (image_col, label_col)]
                image = Path(os.path.expanduser(cells[0]))
                image = image if image.is_absolute() else p.parent / image
                labels = cells[1].replace(",", " ").split()
                problem = ("missing label" if not labels else
                           f"label {cells[1]!r} is not class indices" if not all(
                               v.isdigit() for v in labels) else None)
                ext, data = _image_member(image, where, problem)
                if data is not None:
                    yield {"__key__": f"{k:08d}", ext: data, "cls": " ".join(labels)}
                    k += 1

    return samples()


def image_folder_samples(root: Path, class_file: str | None = None
                         ) -> tuple[list[str], Iterator[dict]]:
    """(class names, samples) of ROOT/CLASS/IMAGE; the classes in `class_file`'s order
    (one name a line: the training shards' classes.txt) or sorted."""
    if not root.is_dir():
        raise DataError(f"--image-folder {root}: no such folder")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise DataError(f"--image-folder {root}: no class folders (expected ROOT/CLASS/IMAGE)")
    classes = found
    if class_file is not None:
        try:
            classes = [line.strip() for line in Path(class_file).read_text().splitlines()
                       if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"--classes {class_file}: cannot read ({e})") from None
        if unknown := sorted(set(found) - set(classes)):
            raise DataError(f"--classes {class_file}: no class {', '.join(unknown[:5])} of "
                            f"{root} in it")
        found = [c for c in classes if (root / c).is_dir()]

    def samples() -> Iterator[dict]:
        k = 0
        for label, name in enumerate(classes):
            if name not in found:
                continue
            for path in sorted((root / name).iterdir()):
                ext = _RAW_IMAGE_EXTS.get(path.suffix.lower())
                if ext is None:
                    if path.is_file():
                        warnings.warn(f"{path}: not a .jpg/.jpeg/.png/.webp file: skipped",
                                      stacklevel=2)
                    continue
                try:
                    data = path.read_bytes()
                except OSError as e:
                    warnings.warn(f"{path}: cannot read ({e.strerror}): skipped", stacklevel=2)
                    continue
                yield {"__key__": f"{k:08d}", ext: data, "cls": label}
                k += 1

    return classes, samples()


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
    p.add_argument("--from", dest="source", choices=("digits", "mnist5k", "csv", "image-folder"),
                   required=True,
                   help="the embedded captioned digits / MNIST-5k (image, caption and class), "
                        "a --csv file, or an --image-folder")
    p.add_argument("--csv", help="with --from csv: a .csv / .tsv file with a header naming the "
                                 "image and caption columns (e.g. image,caption), or the image "
                                 "and label columns (image,label) for classification shards")
    p.add_argument("--image-folder", help="with --from image-folder: ROOT/CLASS/IMAGE files")
    p.add_argument("--classes", help="with --from image-folder: the class names in label order, "
                                     "one a line (for a held-out split: the training shards' "
                                     "classes.txt, so that labels agree); default: the sorted "
                                     "class folders")
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
    if (args.source == "image-folder") != bool(args.image_folder):
        return fail("--from image-folder and --image-folder DIR go together")
    if args.classes and args.source != "image-folder":
        return fail("--classes applies to --from image-folder")
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
    classes = None
    classification = args.source in ("image-folder",)
    try:
        if args.source == "image-folder":
            classes, samples = image_folder_samples(Path(args.image_folder), args.classes)
        elif args.source == "csv":
            samples = csv_label_samples(args.csv)
            classification = samples is not None
            samples = samples if classification else csv_samples(args.csv)
        else:
            samples = digit_samples(args.source, args.split, args.seed)
        total, shards = write_shards(samples, output, args.samples_per_shard)
        if total == 0:
            raise DataError(f"no readable sample in {args.csv or args.image_folder} (see the "
                            "warnings above)")
        if classes is not None:
            (output / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    except (DataError, OSError, KeyboardInterrupt) as e:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            print("make_shards: interrupted; no shard left", file=sys.stderr)
            return 130
        return fail(str(e) if isinstance(e, DataError)
                    else f"--output {output}: cannot write ({e.strerror})")
    pattern = f"'{output}/{{000000..{shards - 1:06d}}}.tar'"
    use = (f"--dataset shards --data-path (or --valid-data-path) {pattern}" if classification
           else f"--image-text-data shards --image-text-path {pattern}")
    if args.source in ("digits", "mnist5k"):
        use += f" | or --dataset shards --data-path {pattern}"
    print(f"make_shards | wrote {total} samples in {shards} shards | {use}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
