"""Export a megavit checkpoint to timm or Hugging Face transformers (from any saved layout).

    python tools/export_hf.py --load runs/vit/ckpt --format timm --output exported/
    python -c "import timm; timm.create_model('local-dir:exported', pretrained=True)"
    python tools/export_hf.py --load runs/vit/ckpt --format transformers --output hf/
    python -c "from transformers import AutoModel; AutoModel.from_pretrained('hf')"

What maps where:
  --format timm          an image model with parallel (ViT-22B) blocks -> timm's
                         VisionTransformer with ParallelScalingBlock (MAP head as
                         AttentionPoolLatent); also loads as transformers' TimmWrapperModel
  --format transformers  a sequential-block ViT with a class token -> ViTForImageClassification
                         (ViTModel without a classifier); a CLIP / SigLIP two-tower model ->
                         CLIPModel / SiglipModel (SigLIP with its sentencepiece tokenizer)

Writes DIR/model.safetensors + DIR/config.json (+ tokenizer files), reading the checkpoint
tensor by tensor (`--buffer-mb` at a time) with a progress line per batch; `--dtype`
converts. A model that does not map is refused with every difference listed (exit status 2),
and nothing is left on disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megavit.checkpointing.checkpointer import resolve_checkpoint
from megavit.config.fields import finite_float
from megavit.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True,
                   help="a checkpoint (iter_N/) or a --save directory (its latest)")
    p.add_argument("--format", required=True, choices=("timm", "transformers"),
                   help="the target library (see above for what maps where)")
    p.add_argument("--output", required=True, help="a new directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights' dtype (default: stored)")
    p.add_argument("--buffer-mb", type=finite_float, default=1024.0,
                   help="read at most this many MiB of tensors at once (default 1024)")
    args = p.parse_args(argv)
    if args.buffer_mb <= 0:
        p.error("--buffer-mb must be positive")
    try:
        from megavit.interop.export_hf import export_checkpoint

        source = resolve_checkpoint(Path(args.load), "--load")
        print(f"export | source {source} | format {args.format}", flush=True)
        export_checkpoint(source, args.format, args.output, DTYPES.get(args.dtype),
                          int(args.buffer_mb * 2**20), lambda line: print(line, flush=True))
    except ImportError as e:
        if (e.name or "").split(".")[0] != "transformers":
            raise
        print(f"export_hf: error: --format transformers needs the transformers package "
              f"(pip install 'megavit[hf]'): {e}", file=sys.stderr)
        return 2
    except (UserError, OSError, ValueError) as e:   # ValueError: e.g. an unusable tokenizer
        print(f"export_hf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export_hf: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
