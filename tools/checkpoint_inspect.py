"""What a megavit checkpoint holds, without loading its tensors.

    python tools/checkpoint_inspect.py runs/vit22b/ckpt            # the latest checkpoint
    python tools/checkpoint_inspect.py runs/vit22b/ckpt/iter_0002000 --tensors

Prints the iteration, the layout it was saved at, the model flags (as they are passed to
megavit.pretrain: paste them back), the training images' preprocessing (mean, std,
resizing: what tools and exports apply), the number of stored tensors and their total size
by group (model, optimizer moments, masters); `--tensors` lists every tensor with its serial
shape, dtype and size. Reads only `megavit_config.json`, the DCP metadata (through the
allowlisting reader: nothing in the file can run code) and the sizes of the shard files (a
missing or truncated one is an error, as loading would find), so it is instant even for
ViT-22B. Exit status 2 with a message for a path that is not a checkpoint or is
incomplete.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

from megavit.checkpointing.checkpointer import resolve_checkpoint
from megavit.checkpointing.model_config import read_checkpoint_info
from megavit.checkpointing.safe_reader import check_checkpoint
from megavit.config import ModelConfig, TextConfig, section_from_dict
from megavit.errors import UserError
from megavit.interop.mapping import model_flags


def group_of(name: str) -> str:
    parts = name.split("/")
    return "/".join(parts[:2]) if parts[0] == "optimizer" and len(parts) > 2 else parts[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("path", help="a checkpoint (iter_N/) or a --save directory (its latest)")
    p.add_argument("--tensors", action="store_true", help="list every stored tensor")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(Path(args.path))
        info = read_checkpoint_info(ckpt)
        metadata = check_checkpoint(ckpt)      # also: every shard file there, none truncated
    except (UserError, OSError) as e:
        print(f"checkpoint_inspect: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("checkpoint_inspect: interrupted", file=sys.stderr)
        return 130
    layout = info["layout"]
    print(f"checkpoint: {ckpt}")
    print(f"iteration: {info['iteration']}")
    print(f"saved at: tp {layout['tp']} x pp {layout['pp']} x dp {layout['dp']}, virtual "
          f"stages {layout['virtual_stages']}, distributed optimizer "
          f"{'on' if layout['distributed_optimizer'] else 'off'} (loads at any layout)")
    if "resharded_from" in layout:
        src = layout["resharded_from"]
        print(f"resharded offline from: tp {src['tp']} x pp {src['pp']} x dp {src['dp']} (stored "
              f"blocks are tp {layout['tp']}'s; RNG streams dropped)")
    print("model flags: " + " ".join(model_flags(ModelConfig(**info["model"]))))
    if "text" in info:
        text = {k: v for k, v in info["text"].items() if k not in ("vocab_size", "pad_id",
                                                                   "eos_id")}
        print("text tower flags: " + " ".join(model_flags(section_from_dict(TextConfig, text))))
    pre = info.get("preprocessing")
    print("preprocessing: " + (" | ".join(f"{k} {v}" for k, v in sorted(pre.items())) if pre
                               else "not recorded (a checkpoint from before megavit recorded "
                                    "it, or of synthetic images)"))
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rows = []
    for name, md in sorted(metadata.state_dict_metadata.items()):
        shape = tuple(getattr(md, "size", ()))
        dtype = getattr(getattr(md, "properties", None), "dtype", None)
        nbytes = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
        group = sizes[group_of(name)]
        group[0] += 1
        group[1] += nbytes
        rows.append((name, shape, str(dtype).replace("torch.", ""), nbytes))
    total = sum(b for _, b in sizes.values())
    print(f"tensors: {len(rows)}, {total / 2**20:.2f} MiB")
    for group, (count, nbytes) in sorted(sizes.items()):
        print(f"  {group:<24} {count:6d} tensors {nbytes / 2**20:12.2f} MiB")
    if args.tensors:
        for name, shape, dtype, nbytes in rows:
            print(f"  {name:<56} {str(list(shape)):<16} {dtype:<9} {nbytes:>12,d} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
