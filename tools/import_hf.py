"""Import a Hugging Face transformers ViTForImageClassification directory as a megavit
checkpoint to fine-tune from.

    python tools/import_hf.py --input exported/ --save runs/ft/ckpt
    python -m megavit.pretrain <printed model flags> --load runs/ft/ckpt --save runs/ft/ckpt ...

Reads DIR/config.json and DIR/model.safetensors (safetensors only: a pickle-only checkpoint
is refused) and writes iteration 0 of the --save directory: weights, fp32 masters, zero Adam
state, so `--load` starts there at any TP / PP / DP layout. Prints the megavit.pretrain
model flags that build the imported model. Exit status 2 with a message for a directory of
another architecture, missing tensors or a shape mismatch; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megavit.checkpointing.convert import ConvertError  # noqa: E402
from megavit.checkpointing.directory import CheckpointDirectoryError  # noqa: E402


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="a transformers model directory")
    p.add_argument("--save", required=True, help="the --save directory to write iteration 0 of")
    args = p.parse_args(argv)
    from megavit.checkpointing.import_hf import import_transformers, model_config_of, model_flags

    try:
        path = import_transformers(args.input, args.save)
        cfg = model_config_of(json.loads((Path(args.input) / "config.json").read_text()))
    except (ConvertError, CheckpointDirectoryError, OSError, KeyError, ValueError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        return 2
    print(f"imported | transformers ViTForImageClassification | path {path}")
    print("model flags: " + " ".join(model_flags(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
