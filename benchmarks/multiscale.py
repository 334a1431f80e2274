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
    merged x2 + fpn   merged at 1/4 and 1/2 of the depth, --feature-layers the block
                      before each merge and the last (three levels, strides 16, 32, 64),
                      then megavit's FPN neck (256 channels) on their maps

Time: the median of `--repeats` forward + backward passes (after one warm-up; the loss is
the mean square of the output, or of every pyramid level). Memory: the bytes autograd keeps
for backward (`SavedTensorMeter`, each storage once, parameters excluded). Parameters: of
the whole module. The seed's two claims are checked against these rows: the pyramid's
"10-15 % training-time overhead" (plain + pyramid against plain) and "saves 40-50 %
parameters vs FPN branches" (the simple pyramid against torchvision's
FeaturePyramidNetwork with the same 256 channels over four levels of width 768, as a
hierarchical stack's merged levels would give: when torchvision imports, as in .venv-timm).
The FPN neck alone is also timed against torchvision's FeaturePyramidNetwork (the peer:
same three levels of width 768, 256 channels; ours adds a per-pixel LayerNorm after the
lateral and the output convolutions, torchvision has none) on the same maps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import torch

from benchmarks.attention_variants import timed
from megavit.config import preset_model_config
from megavit.models.dense import FeaturePyramidNetwork, SimpleFeaturePyramid
from megavit.models.transformer import Runtime
from megavit.models.vit import build_vit
from megavit.parallel.sharding import initialize_parameters
from megavit.parallel.state import serial_state
from megavit.training.peak_flops import cpu_name

NECK_CHANNELS = 256


def variants(blocks: int) -> dict[str, str]:
    """name -> --patch-merge-layers."""
    quarter, half = max(blocks // 4 - 1, 0), max(blocks // 2 - 1, 0)
    return {"plain": "", "merged @ 1/4": str(quarter), "merged @ 1/2": str(half),
            "plain + pyramid": "", "merged x2 + fpn": f"{quarter},{half}"}


def measure(size: int, blocks: int, merges: str, neck_kind: str | None, repeats: int
            ) -> tuple[float, float, int]:
    """(median seconds of forward + backward, bytes kept, parameters)."""
    features = f"{merges},{blocks - 1}" if neck_kind == "fpn" else ""
    cfg = preset_model_config("vit-b", num_layers=blocks, img_h=size, img_w=size,
                              num_classes=0, pooling="gap", patch_merge_layers=merges,
                              feature_layers=features)
    model = build_vit(cfg, Runtime(serial_state().tp), seed=0).train()
    modules = [model]
    neck = None
    if neck_kind == "pyramid":
        neck = SimpleFeaturePyramid(cfg.hidden_size, NECK_CHANNELS)
    elif neck_kind == "fpn":
        neck = FeaturePyramidNetwork(cfg.hidden_size, NECK_CHANNELS, 3)
    if neck is not None:
        initialize_parameters(neck, 0)
        modules.append(neck.train())
    gh, gw = cfg.grid_at(blocks)
    x = torch.randn(cfg.seq_length, 1, cfg.hidden_size, requires_grad=True)

    def run_once(meter):
        with meter or contextlib.nullcontext():
            caught: list[torch.Tensor] = []
            out = model.run_blocks(x, None, model.catch, caught)
            if neck_kind == "pyramid":
                levels = neck(out.permute(1, 2, 0).reshape(1, cfg.hidden_size, gh, gw))
                loss = sum(level.square().mean() for level in levels)
            elif neck_kind == "fpn":
                maps = [model.token_map(f, l) for f, l in zip(caught, cfg.feature_layer_list())]
                loss = sum(level.square().mean() for level in neck(maps))
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
        from torchvision.ops import FeaturePyramidNetwork as Theirs
    except Exception:          # not installed, or not loadable beside this torch
        return None
    fpn = Theirs([768] * 4, NECK_CHANNELS)
    return sum(p.numel() for p in fpn.parameters())


def fpn_against_torchvision(size: int, repeats: int) -> tuple | None:
    """(ours s, theirs s, ours parameters, theirs parameters): forward + backward of the two
    FPNs on the same three 768-wide maps of the merged stack's grids (size/16, /32, /64);
    None without torchvision."""
    try:
        from torchvision.ops import FeaturePyramidNetwork as Theirs
    except Exception:
        return None
    g = size // 16
    maps = [torch.randn(1, 768, g >> k, g >> k, requires_grad=True) for k in range(3)]
    ours = FeaturePyramidNetwork(768, NECK_CHANNELS, 3)
    initialize_parameters(ours, 0)
    theirs = Theirs([768] * 3, NECK_CHANNELS)
    named = lambda levels: {str(k): m for k, m in enumerate(levels)}   # noqa: E731
    rows = []
    for neck, call in ((ours, lambda: ours(maps)),
                       (theirs, lambda: list(theirs(named(maps)).values()))):
        def run_once(meter, neck=neck, call=call):
            with meter or contextlib.nullcontext():
                loss = sum(level.square().mean() for level in call())
            loss.backward()
            neck.zero_grad(set_to_none=True)
            for m in maps:
                m.grad = None
        rows.append(timed(run_once, repeats, list(neck.parameters()))[0])
    return (*rows, sum(p.numel() for p in ours.parameters()),
            sum(p.numel() for p in theirs.parameters()))


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
            kind = ("pyramid" if name == "plain + pyramid" else
                    "fpn" if name.endswith("fpn") else None)
            grid = size // 16
            if kind == "fpn" and grid % 4:
                print(f"| {size} ({grid ** 2}) | {name} | - | - | - | - | - (a {grid}x{grid} "
                      "grid merges only once) |", flush=True)
                continue
            seconds, kept, params = measure(size, args.blocks, merges, kind, args.repeats)
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
    for size in args.sizes:
        peer = fpn_against_torchvision(size, args.repeats)
        if peer is None:
            print("FPN against torchvision: not measured (torchvision does not import; run "
                  "with .venv-timm/bin/python)")
            break
        ours, theirs, p_ours, p_theirs = peer
        print(f"FPN neck at {size} px (three levels of 768, {NECK_CHANNELS} channels), "
              f"forward + backward: megavit {ours:.4f} s, torchvision {theirs:.4f} s "
              f"({ours / theirs:.2f}x); parameters {p_ours / 1e6:.2f} M vs "
              f"{p_theirs / 1e6:.2f} M")
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
