"""What collecting attention maps costs over a plain forward pass, measured in one run.

    python -m benchmarks.attention_maps                       # ViT-S/16 and ViT-B/16, 224 px
    python -m benchmarks.attention_maps --presets vit-b --sizes 224 384 --batch 8

Per row, the same model and images (fp32, eval mode, no gradients, `--threads` threads):
    plain      model(images): the fused attention kernels (SDPA)
    maps       the same inside `record_attention` (megavit/interpret/recording.py): every
               block's attention computed eagerly with its probabilities kept, [b, n, s, s]
               per block, plus the MAP probe's
After one warm-up pass of each, `--repeats` pairs run alternately (plain, maps, plain, ...);
the times are the medians, the ratio is the median of the pairs' maps / plain (alternating
keeps a drift of the machine's speed from landing on one side).
The issue's target: collecting maps costs at most 30 % over the plain pass.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from megavit.config import preset_model_config
from megavit.interpret.recording import record_attention
from megavit.models.transformer import Runtime
from megavit.models.vit import build_vit
from megavit.parallel.state import serial_state
from megavit.training.peak_flops import cpu_name


def paired_seconds(first, second, repeats: int) -> tuple[float, float, float]:
    """(median s of `first`, median s of `second`, median of their per-pair ratios): one
    warm-up of each, then `repeats` pairs run alternately, so a drift of the machine's speed
    (frequent on shared cores) weighs on both alike."""
    first()
    second()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return (statistics.median(a), statistics.median(b),
            statistics.median(y / x for x, y in zip(a, b)))


def measure(preset: str, size: int, batch: int, repeats: int, attention: str
            ) -> tuple[float, float, float, int]:
    """(plain s, maps s, the median per-pair ratio, tokens) for `preset` at size x size
    px."""
    extra = dict(attention_type="window", window_size=14, global_attention_layers="2,5,8,11"
                 ) if attention == "window" else {}
    cfg = preset_model_config(preset, img_h=size, img_w=size, **extra)
    model = build_vit(cfg, Runtime(serial_state().tp), 0).eval()
    images = torch.randn(batch, cfg.num_channels, size, size)

    def plain():
        with torch.no_grad():
            model(images)

    def maps():
        with torch.no_grad(), record_attention(model) as rec:
            model(images)
        return rec

    return (*paired_seconds(plain, maps, repeats), cfg.seq_length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["vit-s", "vit-b"], help="model presets")
    p.add_argument("--sizes", type=int, nargs="+", default=[224], help="image sizes in px")
    p.add_argument("--batch", type=int, default=8, help="images per pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch intra-op threads")
    p.add_argument("--attention", choices=("full", "window"), default="full",
                   help="full attention, or ViTDet windows of 14 with blocks 2,5,8,11 global")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; fp32, "
          f"{args.threads} thread(s), batch {args.batch}, {args.attention} attention")
    print(f"command: python -m benchmarks.attention_maps --presets {' '.join(args.presets)} "
          f"--sizes {' '.join(map(str, args.sizes))} --batch {args.batch} --repeats "
          f"{args.repeats} --attention {args.attention}")
    print("| model | px (tokens) | plain s | with maps s | maps / plain | target <= 1.30 |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        for size in args.sizes:
            plain, maps, ratio, tokens = measure(preset, size, args.batch, args.repeats,
                                                 args.attention)
            print(f"| {preset} | {size} ({tokens}) | {plain:.3f} | {maps:.3f} | {ratio:.2f} | "
                  f"{'met' if ratio <= 1.30 else 'missed'} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
