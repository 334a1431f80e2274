"""Forward + backward time and saved activations of the attention types, against full
attention (SDPA) and segment-anything's ViTDet blocks in the same run, at growing
resolution; and the accuracy of each type on mnist-canvas at one training budget.

    python benchmarks/attention_variants.py                    # 224 and 512 px
    python benchmarks/attention_variants.py --sizes 224 512 1024 --blocks 2
    python benchmarks/attention_variants.py --sizes 1024 --patch 8   # 16,384 tokens
    .venv-timm/bin/python benchmarks/attention_variants.py ...  # + the segment-anything peer
    python benchmarks/attention_variants.py --sizes --accuracy  # + examples/attention_canvas.sh

ViT-B width (768, 12 heads, MLP 3072), `--blocks` blocks, patch `--patch` (16), batch 1, fp32 on the
CPU, one thread unless --threads says otherwise. Each type runs the same ViT-22B-style
(parallel) blocks on the same input: `full`; `window` (14x14 windows, every block; ViTDet
uses 14 at 1024 px); `window+global` (ViTDet's pattern: windows with the last block
global); `local-global` (windows + one global token per window); `linear`. Time: the median
of `--repeats` forward + backward passes (after one warm-up); memory: the bytes autograd
keeps for backward (`SavedTensorMeter`, each storage once), per block. Ratios are against
`full` at the same size.

Peer (when segment-anything is importable, as in .venv-timm): segment-anything's
`ImageEncoderViT` blocks (windows of 14, the last block global, no relative positions)
against megavit's classic pre-norm blocks (the same layers and biases) with
`--attention-type window --window-size 14 --global-attention-layers <last>`, timed the same
way, alternating. Target: megavit's step time <= 1.0x segment-anything's.

--accuracy runs `examples/attention_canvas.sh` (full, window + global, local-global,
linear on --dataset mnist-canvas, the same budget each) and prints its table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from megavit.training.peak_flops import cpu_name
from megavit.config import preset_model_config
from megavit.models.transformer import Runtime
from megavit.models.vit import build_vit
from megavit.parallel.memory import SavedTensorMeter
from megavit.parallel.state import serial_state

TYPES = {  # name: model flags
    "full": {},
    "window": {"attention_type": "window", "window_size": 14},
    "window+global": {"attention_type": "window", "window_size": 14},   # + last block global
    "local-global": {"attention_type": "local-global", "window_size": 14},
    "linear": {"attention_type": "linear"},
}
CLASSIC = dict(block_type="sequential", qk_layernorm=False, add_qkv_bias=True,   # as SAM's
               add_proj_bias=True, norm_bias=True, add_mlp_bias=True, activation="gelu")




def timed(run_once, repeats: int, exclude: list) -> tuple[float, float]:
    """(median seconds of `run_once()` (forward + backward) over `repeats` passes after a
    warm-up that is also metered, bytes its forward keeps). `run_once(meter)` runs the
    forward inside `meter` when one is given."""
    times, meter = [], SavedTensorMeter(exclude)
    for r in range(repeats + 1):
        start = time.perf_counter()
        run_once(meter if r == 0 else None)
        if r:
            times.append(time.perf_counter() - start)
    return statistics.median(times), meter.bytes


def measure(kind: str, size: int, blocks: int, repeats: int, classic: bool = False,
            patch: int = 16) -> tuple[float, float]:
    """(median seconds of forward + backward, bytes kept per block) of `kind` at `size` px
    with `patch` px patches; `classic`: pre-norm blocks with biases, as segment-anything's."""
    flags = dict(TYPES[kind])
    if kind == "window+global":
        flags["global_attention_layers"] = str(blocks - 1)
    side = size // patch
    if "window_size" in flags:
        flags["window_size"] = min(flags["window_size"], side)
    if classic:
        flags.update(CLASSIC)
    cfg = preset_model_config("vit-b", num_layers=blocks, img_h=size, img_w=size,
                              patch_dim=patch, num_classes=0, **flags)
    model = build_vit(cfg, Runtime(serial_state().tp), seed=0)
    model.train()
    x = torch.randn(cfg.seq_length, 1, cfg.hidden_size, requires_grad=True)

    def run_once(meter):
        with meter or contextlib.nullcontext():
            out = model.run_blocks(x, None)
        out.square().mean().backward()
        model.zero_grad(set_to_none=True)
        x.grad = None

    seconds, saved = timed(run_once, repeats, [*model.parameters(), *model.buffers()])
    return seconds, saved / blocks


def measure_sam(size: int, blocks: int, repeats: int, patch: int = 16
                ) -> tuple[float, float]:
    """The same for segment-anything's ImageEncoderViT blocks (window 14, last global)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    side = size // patch
    encoder = ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=768, depth=blocks,
                              num_heads=12, mlp_ratio=4.0, qkv_bias=True, use_rel_pos=False,
                              window_size=min(14, side), global_attn_indexes=(blocks - 1,))
    encoder.train()
    x = torch.randn(1, side, side, 768, requires_grad=True)

    def run_once(meter):
        with meter or contextlib.nullcontext():
            out = x
            for block in encoder.blocks:
                out = block(out)
        out.square().mean().backward()
        encoder.zero_grad(set_to_none=True)
        x.grad = None

    seconds, saved = timed(run_once, repeats, [*encoder.parameters(), *encoder.buffers()])
    return seconds, saved / blocks


def sam_fits(tokens: int) -> bool:
    """Whether segment-anything's global block fits this machine's memory: its attention
    builds 12 heads' [s, s] fp32 scores and keeps softmax and dropout-free products of that
    size for backward (about three such matrices)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 3 * 12 * tokens * tokens * 4 < 0.7 * total


def sam_available() -> bool:
    return importlib.util.find_spec("segment_anything") is not None


def accuracy_table() -> int:
    """Run examples/attention_canvas.sh and print its table (its own command and timing)."""
    script = Path(__file__).resolve().parents[1] / "examples" / "attention_canvas.sh"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(script)], env=env).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=[224, 512],
                   help="image sizes in px; none: only --accuracy")
    p.add_argument("--patch", type=int, default=16, help="patch size in px")
    p.add_argument("--blocks", type=int, default=2, help="blocks of ViT-B width")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per type and size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--accuracy", action="store_true",
                   help="also train each type on mnist-canvas (examples/attention_canvas.sh, "
                        "~20 min on 2 cores)")
    args = p.parse_args(argv)
    if args.patch < 1 or any(s % args.patch or s < 2 * args.patch for s in args.sizes):
        print(f"attention_variants: --sizes must be multiples of --patch {args.patch}, at "
              "least two patches", file=sys.stderr)
        return 2
    if args.blocks < 2:
        print("attention_variants: --blocks must be at least 2 (window blocks and a global "
              "one)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; fp32, "
          f"{args.threads} thread(s)")
    print(f"command: {Path(sys.executable).name} benchmarks/attention_variants.py --sizes "
          f"{' '.join(map(str, args.sizes))} --patch {args.patch} --blocks {args.blocks} --repeats {args.repeats}"
          f"{' --accuracy' if args.accuracy else ''}")
    if args.sizes:
        print(f"patch {args.patch}")
        print("| px | tokens | type | fwd+bwd s | x full | saved MiB / block | x full |")
        print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        base = None
        for kind in TYPES:
            seconds, saved = measure(kind, size, args.blocks, args.repeats, patch=args.patch)
            base = base or (seconds, saved)
            print(f"| {size} | {(size // args.patch) ** 2} | {kind} | {seconds:.3f} | "
                  f"{seconds / base[0]:.2f} | {saved / 2**20:.1f} | {saved / base[1]:.2f} |",
                  flush=True)
    if args.sizes and sam_available():
        print("\npeer: segment-anything ImageEncoderViT blocks vs megavit classic blocks, "
              "window 14 + last block global (target: time ratio <= 1.0)")
        print("| px | SAM fwd+bwd s | megavit s | megavit / SAM | SAM saved MiB / block | "
              "megavit | megavit / SAM |")
        print("|---|---|---|---|---|---|---|")
        for size in args.sizes:
            if not sam_fits((size // args.patch) ** 2):
                print(f"| {size} | not run: its global block's [s, s] scores (s = "
                      f"{(size // args.patch) ** 2}) do not fit this machine's memory | | | | | |")
                continue
            sam = measure_sam(size, args.blocks, args.repeats, args.patch)
            ours = measure("window+global", size, args.blocks, args.repeats, classic=True,
                           patch=args.patch)
            print(f"| {size} | {sam[0]:.3f} | {ours[0]:.3f} | {ours[0] / sam[0]:.2f} | "
                  f"{sam[1] / 2**20:.1f} | {ours[1] / 2**20:.1f} | {ours[1] / sam[1]:.2f} |",
                  flush=True)
    elif args.sizes:
        print("\npeer: segment-anything is not installed in this environment; run with "
              ".venv-timm/bin/python (make venv-timm installs it)")
    return accuracy_table() if args.accuracy else 0


if __name__ == "__main__":
    sys.exit(main())
