"""What a megavit checkpoint holds, without loading its tensors.

    python tools/checkpoint_inspect.py runs/vit22b/ckpt            # the latest checkpoint
    python tools/checkpoint_inspect.py runs/vit22b/ckpt/iter_0002000 --tensors

Prints the iteration, the layout it was saved at, the model flags, the training images'
preprocessing (mean, std, resizing: what tools and exports apply), the number of stored
tensors and their total size by group (model, optimizer moments, masters); `--tensors` lists
every tensor with its serial shape, dtype and size. Reads only `megavit_config.json` and the
DCP metadata (through the allowlisting reader: nothing in the file can run code), so it is
instant even for ViT-22B. Exit status 2 with a message for a path that is not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from megavit.checkpointing.checkpointer import CONFIG_FILE, resolve_checkpoint
from megavit.checkpointing.directory import CheckpointDirectoryError
from megavit.checkpointing.safe_reader import SafeFileSystemReader, UnsafeCheckpointError


def group_of(name: str) -> str:
    parts = name.split("/")
    return "/".join(parts[:2]) if parts[0] == "optimizer" and len(parts) > 2 else parts[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", help="a checkpoint (iter_N/) or a --save directory (its latest)")
    p.add_argument("--tensors", action="store_true", help="list every stored tensor")
    args = p.parse_args(argv)
    try:
        ckpt = resolve_checkpoint(Path(args.path))
        info = json.loads((ckpt / CONFIG_FILE).read_text())
        metadata = SafeFileSystemReader(str(ckpt)).read_metadata()
    except (CheckpointDirectoryError, UnsafeCheckpointError, FileNotFoundError,
            json.JSONDecodeError) as e:
        print(f"checkpoint_inspect: error: {e}", file=sys.stderr)
        return 2
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
    model = info["model"]
    print("model: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(model.items())))
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
