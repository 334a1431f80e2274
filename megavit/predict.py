"""Entry point: `python -m megavit.predict CKPT --images a.png b.jpg ...` (or
`megavit-predict`): run a trained checkpoint on image files, in one process on the CPU.

    python -m megavit.predict runs/quickstart/ckpt --images cat.png dog.jpg --top-k 3
    python -m megavit.predict runs/clip/ckpt --image-folder photos/ \\
        --labels cat dog "traffic light" --templates "a photo of a {}."
    python -m megavit.predict runs/seg/ckpt --image-folder scans/ --output-dir maps/ \\
        --output predictions.jsonl

CKPT is a --save directory (its latest checkpoint) or one iter_N/ directory, saved at any
layout. What is predicted follows the checkpoint:

    classifier    the --top-k classes with their softmax probabilities (class names when
                  the checkpoint records them, e.g. an image folder's sub-folder names)
    two-tower     zero-shot: each of --labels is embedded through --templates (averaged
                  over templates, as tools/zero_shot.py does); the --top-k labels with their
                  probabilities (softmax over the scaled cosine similarities; SigLIP: each
                  label's own sigmoid)
    segmentation  a PNG label map per image in --output-dir (DIR/STEM.png, the image's own
                  size when the preprocessing squashes it, else the model's input size),
                  and the classes present with their pixel shares

Images are read as the checkpoint's preprocessing says (decode, resize, crop, normalise as
in training); `--img-h H --img-w W` runs a ViT or segmentation model at another size
(learned position tables resized; the patch, merges and windows must fit it). One line per image goes to stdout, `predict | images N | unreadable K` at the
end; `--output FILE` writes one JSON object per image. A missing or undecodable image is
named on stderr and left out (the others are still predicted); with `--strict` it stops the
run with exit status 2. A directory that holds no checkpoint, a checkpoint that does not
fit the request (--labels for a classifier, no --labels for a two-tower one) or no readable
image at all: a message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROG = "python -m megavit.predict"


def parser() -> argparse.ArgumentParser:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a --save directory (its latest checkpoint) or a checkpoint (iter_N/)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", metavar="FILE", help="image files to predict")
    source.add_argument("--image-folder", metavar="DIR",
                        help=f"every image file under DIR, recursively, in sorted order "
                             f"({', '.join(IMAGE_SUFFIXES)})")
    p.add_argument("--top-k", type=int, default=5,
                   help="classes (or labels) to report per image, most probable first")
    p.add_argument("--labels", nargs="+", metavar="NAME",
                   help="two-tower checkpoints: the candidate labels for zero-shot prediction")
    p.add_argument("--templates", nargs="+", default=["a photo of a {}."], metavar="T",
                   help="two-tower checkpoints: prompt templates, {} replaced by each label")
    p.add_argument("--tokenizer-model", metavar="FILE",
                   help="two-tower checkpoints: a tokenizer .model file, when the checkpoint "
                        "has none beside it")
    p.add_argument("--output", metavar="FILE",
                   help="write one JSON object per predicted image to FILE (JSON lines)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="segmentation checkpoints: where the PNG label maps go (required "
                        "for them)")
    p.add_argument("--strict", action="store_true",
                   help="stop with exit status 2 at the first missing or unreadable image "
                        "(default: name it on stderr and predict the others)")
    p.add_argument("--img-h", type=int, metavar="H",
                   help="run the model on H-pixel-high images instead of its training size "
                        "(learned position tables resized bicubically; with --img-w)")
    p.add_argument("--img-w", type=int, metavar="W", help="the width that goes with --img-h")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1, metavar="T",
                   help="split the model over T processes (under torchrun, mpirun or srun; "
                        "the world size must be T): for models too big for one; rank 0 "
                        "writes the output")
    return p


def image_files(args: argparse.Namespace) -> list[Path]:
    """The files to predict, in order (a folder's, recursively and sorted)."""
    from megavit.data.datasets import DataError

    if args.images:
        return [Path(f) for f in args.images]
    root = Path(args.image_folder)
    if not root.is_dir():
        raise DataError(f"--image-folder {root}: no such directory")
    files = sorted(f for f in root.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES
                   and f.is_file())
    if not files:
        raise DataError(f"--image-folder {root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def check_request(args: argparse.Namespace, kind: str) -> None:
    """ConfigError when the flags do not fit the checkpoint's kind."""
    from megavit.config import ConfigError

    if args.labels and kind != "two-tower":
        raise ConfigError(f"--labels: a {kind} checkpoint predicts its own classes; --labels "
                          "is for two-tower (CLIP / SigLIP / LiT) checkpoints")
    if kind == "two-tower" and not args.labels:
        raise ConfigError("a two-tower checkpoint predicts by zero-shot: give the candidate "
                          "--labels (and --templates)")
    if kind == "segmentation" and not args.output_dir:
        raise ConfigError("a segmentation checkpoint writes PNG label maps: give --output-dir")
    if args.output_dir and kind != "segmentation":
        raise ConfigError(f"--output-dir: a {kind} checkpoint writes no label maps")
    for t in args.templates if args.labels else ():
        if t.count("{}") != 1:
            raise ConfigError(f"--templates {t!r}: needs exactly one {{}} for the label")


class Reader:
    """Reads image files as the checkpoint's preprocessing says; remembers the unreadable."""

    def __init__(self, preprocessing, strict: bool, quiet: bool = False) -> None:
        self.pre, self.strict, self.quiet = preprocessing, strict, quiet
        self.unreadable: list[str] = []

    def read(self, path: Path):
        """(the model input [c, H, W], the file's (height, width)) or None, named on
        stderr, when it is missing or does not decode (a DataError with --strict)."""
        from PIL import Image

        from megavit.data.datasets import DataError
        from megavit.data.preprocessing import read_pixels

        try:
            with Image.open(path) as image:
                size = (image.height, image.width)
            return self.pre.normalise(read_pixels(path, self.pre)[None])[0], size
        except (OSError, ValueError, SyntaxError) as e:      # PIL's decoding errors
            why = "no such file" if isinstance(e, FileNotFoundError) else f"cannot read it ({e})"
            if self.strict:
                raise DataError(f"{path}: {why} (--strict)") from None
            if not self.quiet:
                print(f"predict: warning: {path}: {why}; left out", file=sys.stderr)
            self.unreadable.append(str(path))
            return None


def top_k(probabilities, names: Sequence[str], k: int, key: str) -> list[dict[str, Any]]:
    """The k most probable entries of [C] probabilities as {key, index, probability}."""
    values, indices = probabilities.topk(min(k, len(probabilities)))
    return [{key: names[i] if i < len(names) else str(i), "index": int(i),
             "probability": round(float(v), 6)} for v, i in zip(values, indices.tolist())]


def predictor(loaded, args: argparse.Namespace, write: bool = True):
    """batch [n, c, H, W], sizes, paths -> one result dict per image."""
    import torch
    import torch.nn.functional as F

    model = loaded.model
    if loaded.kind == "classifier":
        names = loaded.class_names

        def classify(batch, sizes, paths):
            probabilities = model(batch).float().softmax(dim=-1)
            return [{"top_k": top_k(p, names, args.top_k, "class")} for p in probabilities]
        return classify
    if loaded.kind == "two-tower":
        from megavit.tasks.image_text.zero_shot import class_embeddings, prompts_for

        tokenizer = loaded.tokenizer
        labels = args.labels
        with torch.no_grad():
            classes = class_embeddings(lambda t: model.encode_text(tokenizer.encode(t)),
                                       prompts_for(labels, args.templates))
        scale = model.logit_scale.exp()
        bias = model.logit_bias

        def zero_shot(batch, sizes, paths):
            logits = scale * model.encode_image(batch) @ classes.t()
            probabilities = (torch.sigmoid(logits + bias) if bias is not None else
                             logits.softmax(dim=-1))
            return [{"top_k": top_k(p, labels, args.top_k, "label")} for p in probabilities]
        return zero_shot
    from PIL import Image

    out = Path(args.output_dir)
    names = loaded.class_names
    squash = loaded.preprocessing.crop_mode == "squash" and loaded.preprocessing.crop_pct == 1

    def segment(batch, sizes, paths):
        logits = model(batch).float()
        results = []
        for k, path in enumerate(paths):
            one = logits[k:k + 1]
            if squash and tuple(one.shape[-2:]) != sizes[k]:   # back to the image's pixels
                one = F.interpolate(one, size=sizes[k], mode="bilinear", align_corners=False)
            labels = one[0].argmax(dim=0)
            if labels.max() > 255:
                raise ValueError("more than 256 classes do not fit an 8-bit PNG label map")
            target = out / f"{Path(path).stem}.png"
            if write:
                Image.fromarray(labels.byte().cpu().numpy()).save(target)
            counts = torch.bincount(labels.flatten(), minlength=one.shape[1])
            present = [{"class": names[c] if c < len(names) else str(c), "index": c,
                        "pixel_share": round(int(counts[c]) / labels.numel(), 6)}
                       for c in counts.nonzero().flatten().tolist()]
            results.append({"label_map": str(target), "size": list(labels.shape),
                            "classes": present})
        return results
    return segment


def describe(result: dict[str, Any]) -> str:
    """One human-readable line's body for a result."""
    if "top_k" in result:
        key = "class" if "class" in result["top_k"][0] else "label"
        return " | ".join(f"{e[key]} {e['probability']:.4f}" for e in result["top_k"])
    shares = ", ".join(f"{c['class']} {c['pixel_share']:.3f}" for c in result["classes"])
    return f"{result['label_map']} | classes {shares}"


def predict(args: argparse.Namespace, pstate=None) -> int:
    """Predict as the flags say; `pstate`: the process group for
    --tensor-model-parallel-size > 1 (rank 0 prints and writes, every rank computes)."""
    import torch

    from megavit.checkpointing.inference import load_for_inference
    from megavit.data.datasets import DataError

    if args.top_k < 1 or args.batch_size < 1:
        raise DataError(f"--top-k {args.top_k} / --batch-size {args.batch_size}: both must "
                        "be at least 1")
    main_rank = pstate is None or pstate.rank == 0
    files = image_files(args)
    if (args.img_h is None) != (args.img_w is None):
        raise DataError("--img-h and --img-w go together")
    loaded = load_for_inference(Path(args.checkpoint), args.tokenizer_model, pstate)
    check_request(args, loaded.kind)
    if args.img_h is not None:
        from megavit.checkpointing.inference import at_resolution

        loaded = at_resolution(loaded, args.img_h, args.img_w)
    if loaded.note and main_rank:
        print(f"predict: warning: {loaded.note}", file=sys.stderr)
    if args.output_dir and main_rank:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if main_rank:
        print(f"predict | checkpoint {loaded.checkpoint} | {loaded.kind} | images "
              f"{len(files)}" + (f" | tensor-parallel {pstate.tp.size}" if pstate else ""),
              flush=True)
    reader = Reader(loaded.preprocessing, args.strict, quiet=not main_rank)
    run = predictor(loaded, args, write=main_rank)
    done = 0
    sink = open(args.output, "w") if args.output and main_rank else None
    try:
        with torch.no_grad():
            for start in range(0, len(files), args.batch_size):
                read = [(f, r) for f in files[start:start + args.batch_size]
                        if (r := reader.read(f)) is not None]
                if not read:
                    continue
                batch = torch.stack([r[0] for _, r in read]).to(
                    pstate.device if pstate is not None else "cpu")
                results = run(batch, [r[1] for _, r in read], [str(f) for f, _ in read])
                for (path, _), result in zip(read, results):
                    record = {"image": str(path), **result}
                    if main_rank:
                        print(f"{path} | {describe(record)}", flush=True)
                    if sink is not None:
                        sink.write(json.dumps(record) + "\n")
                    done += 1
    finally:
        if sink is not None:
            sink.close()
    if main_rank:
        print(f"predict | images {done} | unreadable {len(reader.unreadable)}", flush=True)
    if not done:
        raise DataError(f"none of the {len(files)} images could be read (see the warnings)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from megavit.errors import UserError

    args = parser().parse_args(argv)
    if args.tensor_model_parallel_size > 1:
        return predict_parallel(args)
    try:
        return predict(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def predict_parallel(args: argparse.Namespace) -> int:
    """--tensor-model-parallel-size T under a launcher: the model split over the T
    processes of the world (each reads every image; rank 0 prints and writes)."""
    from megavit.errors import UserError
    from megavit.parallel.launcher import LaunchError, detect_launch
    from megavit.parallel.state import destroy_parallel_state, init_parallel_state

    t = args.tensor_model_parallel_size
    try:
        info = detect_launch()
        if info.world_size != t:
            raise LaunchError(f"--tensor-model-parallel-size {t}: start {t} processes "
                              f"(torchrun --nproc-per-node {t} -m megavit.predict ...); "
                              f"this world has {info.world_size}")
    except LaunchError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    pstate = init_parallel_state(t, "auto", "auto")
    try:
        status = predict(args, pstate)
    except UserError as e:
        if pstate.rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        status = 2
    destroy_parallel_state(pstate, barrier=False)
    return status


if __name__ == "__main__":
    sys.exit(main())
