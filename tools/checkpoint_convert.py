"""Convert a megavit checkpoint offline: reshard it for another TP size, or consolidate its
weights into one safetensors file. Reads and writes tensor by tensor (bounded memory).

    # the latest checkpoint of runs/a/ckpt, stored as a TP=8 run stores it, into runs/b/ckpt
    python tools/checkpoint_convert.py runs/a/ckpt --target-tensor-parallel-size 8 \\
        --output runs/b/ckpt
    # the weights, serial names, bf16, one file
    python tools/checkpoint_convert.py runs/a/ckpt --to-safetensors vit.safetensors --dtype bf16

Pipeline, virtual-pipeline and data-parallel sizes and the distributed optimizer need no
conversion: a checkpoint stores pieces per serial parameter, one copy of replicas, and
optimizer state shaped like the parameters, so it loads under any of them as it is. What
depends on the layout is how each piece is cut over tensor-parallel ranks; a checkpoint
stored at the run's TP size is read by each rank without reading other ranks' blocks.
Progress: one `convert | tensors i/N | MiB ...` line per batch. Exit status 2 with a message
for a bad path or target; nothing is left half-written (the output is staged and renamed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from megavit.checkpointing.checkpointer import resolve_checkpoint
from megavit.checkpointing.offline import ConvertError
from megavit.checkpointing.reshard import reshard
from megavit.config.fields import finite_float
from megavit.errors import UserError
from megavit.interop.consolidate import consolidate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(allow_abbrev=False, description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint (iter_N/) or a --save directory (its latest)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--target-tensor-parallel-size", type=int, metavar="T",
                      help="reshard: store every tensor as a TP=T run holds it (needs --output)")
    what.add_argument("--to-safetensors", metavar="FILE",
                      help="consolidate: the model weights into one safetensors file")
    p.add_argument("--output", metavar="DIR",
                   help="reshard: the --save directory to write the converted checkpoint into "
                        "(same iteration number; the pointer names it)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="consolidate: the weights' dtype (default: as stored)")
    p.add_argument("--overwrite", action="store_true",
                   help="consolidate: replace an existing --to-safetensors file (refused "
                        "without it)")
    p.add_argument("--buffer-mb", type=finite_float, default=1024.0,
                   help="read at most this many MiB of stored tensors at once (a larger "
                        "tensor is read alone); default 1024")
    args = p.parse_args(argv)
    if args.target_tensor_parallel_size is not None:
        if args.target_tensor_parallel_size < 1:
            p.error("--target-tensor-parallel-size must be at least 1")
        if not args.output:
            p.error("--target-tensor-parallel-size needs --output DIR")
        if args.dtype:
            p.error("--dtype applies to --to-safetensors only (resharding keeps every dtype)")
    elif args.output:
        p.error("--output applies to --target-tensor-parallel-size; --to-safetensors names "
                "its file")
    if args.overwrite and not args.to_safetensors:
        p.error("--overwrite applies to --to-safetensors (a reshard --output directory that "
                "exists is refused; remove it first)")
    if args.buffer_mb <= 0:
        p.error("--buffer-mb must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    buffer = int(args.buffer_mb * 2**20)
    try:
        source = resolve_checkpoint(Path(args.path))
        print(f"convert | source {source}", flush=True)
        report = lambda line: print(line, flush=True)  # noqa: E731
        if args.to_safetensors:
            out = Path(args.to_safetensors)
            if out.is_dir() or not out.parent.is_dir():
                raise ConvertError(f"--to-safetensors {out}: must name a file in an existing "
                                   "directory")
            if out.exists() and not args.overwrite:
                raise ConvertError(f"--to-safetensors {out}: exists; pass --overwrite to "
                                   "replace it")
            consolidate(source, out, DTYPES.get(args.dtype), buffer, report)
        else:
            reshard(source, args.output, args.target_tensor_parallel_size, buffer, report)
    except (UserError, OSError) as e:    # a bad path or target, a corrupt checkpoint
        print(f"checkpoint_convert: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("checkpoint_convert: interrupted; nothing written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
