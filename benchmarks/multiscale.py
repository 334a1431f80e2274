"""Multi-scale ViTs on the CPU: what patch merging saves and what a feature pyramid costs,
measured in one run.

    python -m benchmarks.multiscale                         # 224 and 512 px, 4 blocks
    python -m benchmarks.multiscale --sizes 224 --blocks 12 --repeats 2

ViT-B width (768, 12 heads, MLP 3072), `--blocks` ViT-22B-style blocks, patch 16, batch 1,
fp32, one thread. Per size, the same blocks:

    plain             no merging
    merged @ 1/4      --patch-merge-layers at a quarter of the depth (after block L/4 - 1)
    merged @ 1/2      ... at half the depth
    plain + pyramid   plain, then ViTDet's simple feature pyramid (models/dense.py, 256
                      channels) on the last map

Time: the median of `--repeats` forward + backward passes (after one warm-up; the loss is
the mean square of the output, or of every pyramid level). Memory: the bytes autograd keeps
for backward (`SavedTensorMeter`, each storage once, parameters excluded). Parameters: of
the whole module. The seed's two claims are checked against these rows: the pyramid's
"10-15 % training-time overhead" (plain + pyramid against plain) and "saves 40-50 %
parameters vs FPN branches" (the simple pyramid against torchvision's
FeaturePyramidNetwork with the same 256 channels over four levels of width 768, as a
hierarchical stack's merged levels would give: when torchvision imports, as in .venv-timm).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from benchmarks.attention_variants import timed
from megavit.config import preset_model_config
from megavit.models.dense import SimpleFeaturePyramid
from megavit.models.transformer import Runtime
from megavit.models.vit import build_vit
from megavit.parallel.sharding import initialize_parameters
from megavit.parallel.state import serial_state
from megavit.training.peak_flops import cpu_name

NECK_CHANNELS = 256


def variants(blocks: int) -> dict[str, str]:
    """name -> --patch-merge-layers."""
    return {"plain": "", "merged @ 1/4": str(max(blocks // 4 - 1, 0)),
            "merged @ 1/2": str(max(blocks // 2 - 1, 0)), "plain + pyramid": ""}


def measure(size: int, blocks: int, merges: str, pyramid: bool, repeats: int
            ) -> tuple[float, float, int]:
    """(median seconds of forward + backward, bytes kept, parameters)."""
    cfg = preset_model_config("vit-b", num_layers=blocks, img_h=size, img_w=size,
                              num_classes=0, pooling="gap", patch_merge_layers=merges)
    model = build_vit(cfg, Runtime(serial_state().tp), seed=0).train()
    modules = [model]
    neck = None
    if pyramid:
        neck = SimpleFeaturePyramid(cfg.hidden_size, NECK_CHANNELS)
        initialize_parameters(neck, 0)
        modules.append(neck.train())
    gh, gw = cfg.grid_at(blocks)
    x = torch.randn(cfg.seq_length, 1, cfg.hidden_size, requires_grad=True)

    def run_once(meter):
        with meter or contextlib.nullcontext():
            out = model.run_blocks(x, None)
            if neck is not None:
                levels = neck(out.permute(1, 2, 0).reshape(1, cfg.hidden_size, gh, gw))
                loss = sum(level.square().mean() for level in levels)
            else:
                loss = out.square().mean()
        loss.backward()
        for m in modules:
            m.zero_grad(set_to_none=True)
        x.grad = None

    exclude = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    seconds, kept = timed(run_once, repeats, exclude)
    params = sum(p.numel() for m in modules for p in m.parameters())
    return seconds, kept, params


def fpn_parameters() -> int | None:
    """torchvision's FeaturePyramidNetwork over four 768-wide levels, 256 channels."""
    try:
        from torchvision.ops import FeaturePyramidNetwork
    except Exception:          # not installed, or not loadable beside this torch
        return None
    fpn = FeaturePyramidNetwork([768] * 4, NECK_CHANNELS)
    return sum(p.numel() for p in fpn.parameters())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512],
                   help="image sizes in px (patch 16; the grid must stay even at each merge)")
    p.add_argument("--blocks", type=int, default=4, help="blocks of ViT-B width (at least 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.blocks < 4:
        print("multiscale: --blocks must be at least 4 (merges at 1/4 and 1/2 depth)",
              file=sys.stderr)
        return 2
    if any(s % 32 for s in args.sizes):
        print("multiscale: --sizes must be multiples of 32 (an even 16-px grid to merge)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; fp32, "
          f"{args.threads} thread(s)")
    print(f"command: python -m benchmarks.multiscale --sizes {' '.join(map(str, args.sizes))} "
          f"--blocks {args.blocks} --repeats {args.repeats}")
    print("| px (tokens) | model | fwd+bwd s | x plain | kept MiB | x plain | parameters M |")
    print("|---|---|---|---|---|---|---|")
    pyramid_rows = []
    for size in args.sizes:
        base = None
        for name, merges in variants(args.blocks).items():
            seconds, kept, params = measure(size, args.blocks, merges,
                                            name == "plain + pyramid", args.repeats)
            base = base or (seconds, kept, params)
            print(f"| {size} ({(size // 16) ** 2}) | {name} | {seconds:.3f} | "
                  f"{seconds / base[0]:.2f} | {kept / 2**20:.1f} | {kept / base[1]:.2f} | "
                  f"{params / 1e6:.2f} |", flush=True)
            if name == "plain + pyramid":
                pyramid_rows.append((size, seconds / base[0] - 1, params - base[2]))
    print()
    for size, overhead, neck in pyramid_rows:
        print(f"seed claim '10-15 % training-time overhead' at {size} px: the pyramid adds "
              f"{100 * overhead:.1f} % to {args.blocks} blocks' forward + backward")
    fpn = fpn_parameters()
    neck = pyramid_rows[0][2] if pyramid_rows else None
    if fpn is None:
        print("seed claim 'saves 40-50 % parameters vs FPN branches': not measured here "
              "(torchvision does not import; run with .venv-timm/bin/python)")
    elif neck is not None:
        change = 100 * (neck / fpn - 1)
        print(f"seed claim 'saves 40-50 % parameters vs FPN branches': simple pyramid "
              f"{neck / 1e6:.2f} M, torchvision FPN over four 768-wide levels "
              f"{fpn / 1e6:.2f} M: the pyramid has {abs(change):.1f} % "
              f"{'more' if change > 0 else 'fewer'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
