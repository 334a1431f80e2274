"""Zero-shot classification with a two-tower (CLIP / SigLIP / LiT) checkpoint.

    # an image folder, one sub-folder per class (its name is the class name)
    python tools/zero_shot.py runs/clip/ckpt --image-folder data/val \\
        --templates "a photo of a {}." "a picture of a {}."
    # the embedded digits' held-out split with their prompt templates
    python tools/zero_shot.py runs/clip/ckpt --dataset digits

Loads the latest checkpoint of a --save directory (or a checkpoint itself) in one process:
both towers' weights at any saved layout, and the tokenizer saved beside them. Images of
--image-folder are prepared as the checkpoint's "preprocessing" section says (the training
images' mean, std and resizing; a checkpoint written before megavit recorded it gets
megavit's image-file reading, with a warning). Each class's prompts (every template filled
with its name) are embedded, averaged and re-normalised; each image goes to the class of
highest cosine similarity. An image file that does not decode is left out with a warning
naming it (and counted: `| unreadable K`). Prints one line per class and
`zero_shot | accuracy A | images N | classes C`. Exit status 2 with a message for a path that
is not a two-tower checkpoint, an empty folder or one without a readable image, or class
names or templates that do not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megavit.checkpointing.checkpointer import CONFIG_FILE, resolve_checkpoint
from megavit.checkpointing.model_config import read_checkpoint_info
from megavit.checkpointing.model_state import CheckpointLoadError
from megavit.config import ModelConfig
from megavit.data.bad_samples import BadSample
from megavit.data.datasets import DataError, ImageFolderDataset
from megavit.data.preprocessing import Preprocessing, checkpoint_preprocessing
from megavit.data.tokenizer import Tokenizer
from megavit.errors import UserError
from megavit.models.two_tower import TwoTowerModel
from megavit.tasks.image_text.zero_shot import class_embeddings, prompts_for


def load_two_tower(path: Path, tokenizer_model: str | None = None
                   ) -> tuple[TwoTowerModel, Tokenizer, dict]:
    """The model and tokenizer of a two-tower checkpoint (or --save directory), in one
    process on the CPU (megavit/checkpointing/inference.py)."""
    from megavit.checkpointing.inference import checkpoint_kind, load_for_inference

    checkpoint = resolve_checkpoint(path)
    if checkpoint_kind(read_checkpoint_info(checkpoint)) != "two-tower":
        raise CheckpointLoadError(f"{checkpoint}: a ViT checkpoint (megavit.pretrain), not a "
                                  "two-tower one (megavit.pretrain_contrastive)")
    loaded = load_for_inference(checkpoint, tokenizer_model)
    return loaded.model, loaded.tokenizer, loaded.info


def _image_folder(root: Path, model_cfg: ModelConfig, pre: Preprocessing):
    if not root.is_dir():
        raise DataError(f"--image-folder {root}: no such directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"--image-folder {root}: no class folders (expected {root}/CLASS/*.png)")
    return ImageFolderDataset(root, classes, model_cfg, root.name, pre), classes


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a two-tower checkpoint (iter_N/) or a --save directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-folder", metavar="DIR",
                        help="DIR/CLASS/*.png|jpg: one folder per class, named by the class")
    source.add_argument("--dataset", choices=("digits", "mnist5k"),
                        help="an embedded digit set's held-out split and its prompts")
    p.add_argument("--class-names", metavar="NAMES",
                   help="comma-separated names to use in the prompts instead of the folder "
                        "names, in the folders' sorted order")
    p.add_argument("--templates", nargs="+", default=["a photo of a {}."], metavar="T",
                   help="prompt templates, {} replaced by the class name "
                        "(default: 'a photo of a {}.'); ignored with --dataset")
    p.add_argument("--tokenizer-model", help="a .model file, when the checkpoint has none")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be at least 1")
    for t in args.templates:
        try:
            filled = t.format("CLASS")
        except (IndexError, KeyError, ValueError):
            filled = ""
        if "{}" not in t or filled != t.replace("{}", "CLASS"):
            p.error(f"--templates {t!r}: needs exactly one {{}} for the class name (and no "
                    "other braces)")
    try:
        model, tokenizer, info = load_two_tower(Path(args.path), args.tokenizer_model)
        model_cfg = ModelConfig(**info["model"])
        if args.dataset:
            from megavit.data.image_text import captioned_digits

            data = captioned_digits(model_cfg, 0, args.dataset)[1]
            names = [f"{k}" for k in range(10)]
            prompts = data.class_prompts()
        else:
            where = resolve_checkpoint(Path(args.path)) / CONFIG_FILE
            pre, note = checkpoint_preprocessing(info, model_cfg, str(where))
            if note:
                print(f"zero_shot: warning: {note}", file=sys.stderr)
            data, names = _image_folder(Path(args.image_folder), model_cfg, pre)
            if args.class_names is not None:
                given = [n.strip() for n in args.class_names.split(",")]
                if len(given) != len(names) or not all(given):
                    raise DataError(f"--class-names gives {len(given)} names"
                                    f"{' (some empty)' if not all(given) else ''} for the "
                                    f"{len(names)} class folders {names}")
                names = given
            prompts = prompts_for([n.replace("_", " ") for n in names], args.templates)
        correct, count, unreadable = evaluate(model, tokenizer, data, prompts, args.batch_size)
        if not int(count.sum()):
            raise DataError(f"--image-folder {args.image_folder}: none of its {len(data)} "
                            "images is readable (see the warnings)")
    except (UserError, OSError) as e:
        print(f"zero_shot: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zero_shot: interrupted", file=sys.stderr)
        return 130
    for k, name in enumerate(names):
        print(f"  {name:<24} {int(correct[k]):6d}/{int(count[k]):<6d} "
              f"{correct[k] / max(int(count[k]), 1):.4f}")
    total = int(count.sum())
    print(f"zero_shot | accuracy {int(correct.sum()) / max(total, 1):.4f} | images {total} | "
          f"classes {len(names)}" + (f" | unreadable {unreadable}" if unreadable else ""))
    return 0


@torch.no_grad()
def evaluate(model: TwoTowerModel, tokenizer: Tokenizer, data, prompts: list[list[str]],
             batch_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(correct, images) per class and the number of unreadable images left out."""
    classes = class_embeddings(lambda t: model.encode_text(tokenizer.encode(t)), prompts)
    correct = torch.zeros(len(prompts), dtype=torch.long)
    count = torch.zeros(len(prompts), dtype=torch.long)
    unreadable = 0
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        images, labels = _readable(data, idx)
        unreadable += len(idx) - len(labels)
        if len(labels):
            predicted = (model.encode_image(images) @ classes.t()).argmax(dim=-1)
            correct += torch.bincount(labels[predicted == labels], minlength=len(prompts))
            count += torch.bincount(labels, minlength=len(prompts))
        print(f"zero_shot | images {int(count.sum())}/{len(data)}", flush=True)
    return correct, count, unreadable


def _readable(data, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of `idx`; an image-folder file that does not decode is left out
    with a warning naming it (not replaced, as training does: each image counts once)."""
    if not isinstance(data, ImageFolderDataset):
        return data.get(idx)[0], data.labels_of(idx)
    read = []
    for i in idx.tolist():
        try:
            read.append(data.read(i))
        except BadSample as e:
            print(f"zero_shot: warning: {e}: left out", file=sys.stderr)
    if not read:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images, labels = zip(*read)
    return (data.preprocessing.normalise(torch.stack(images)),
            torch.tensor(labels, dtype=torch.long))

if __name__ == "__main__":
    sys.exit(main())
