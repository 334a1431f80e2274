"""Import a timm or Hugging Face transformers model directory as a megavit checkpoint to
fine-tune from.

    python tools/import_hf.py --input exported/ --save runs/ft/ckpt --tensor-model-parallel-size 2
    python -m megavit.pretrain <printed model flags> --load runs/ft/ckpt --save runs/ft/ckpt ...

Reads DIR/config.json and DIR/model.safetensors, or the shards that
model.safetensors.index.json lists (safetensors only: a pickle-only checkpoint is refused). What maps: transformers ViTModel / ViTForImageClassification, CLIPModel and
SiglipModel (model_type vit, clip, siglip), and timm VisionTransformers with parallel
(ParallelScalingBlock) blocks. Writes iteration 0 of the --save directory: weights, fp32
masters, zero Adam state, so `--load` starts there at any TP / PP / DP layout; the tensors
are stored in the blocks a --tensor-model-parallel-size run reads. Parameters are made and
written `--buffer-mb` at a time with a progress line per batch. Prints the model flags
that build the imported model. Exit status 2 with a message for a directory of another
architecture, missing or unexpected tensors or a shape mismatch; nothing is left
half-written.
"""

from __future__ import annotations

import argparse
import sys

from megavit.config.fields import finite_float
from megavit.errors import UserError


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a timm or transformers model directory")
    p.add_argument("--save", required=True, help="the --save directory to write iteration 0 of")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="store the tensors in the blocks this TP size reads (default 1; any "
                        "layout loads the checkpoint)")
    p.add_argument("--buffer-mb", type=finite_float, default=1024.0,
                   help="make and write at most this many MiB of training state at once "
                        "(default 1024)")
    args = p.parse_args(argv)
    if args.buffer_mb <= 0:
        p.error("--buffer-mb must be positive")
    if args.tensor_model_parallel_size < 1:
        p.error("--tensor-model-parallel-size must be at least 1")
    from megavit.interop.import_hf import import_directory

    try:
        path, plan = import_directory(args.input, args.save, args.tensor_model_parallel_size,
                                      int(args.buffer_mb * 2**20),
                                      lambda line: print(line, flush=True))
    except (UserError, OSError, KeyError, ValueError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("import_hf: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"imported | {plan.source} | tp {args.tensor_model_parallel_size} | path {path}")
    print("model flags: " + " ".join(plan.flags))
    return 0


if __name__ == "__main__":
    sys.exit(main())
