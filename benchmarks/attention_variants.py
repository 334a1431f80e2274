"""Forward + backward time and saved activations of the attention types, against full
attention (SDPA) in the same run, at growing resolution.

    python benchmarks/attention_variants.py                    # 224 and 512 px
    python benchmarks/attention_variants.py --sizes 224 512 1024 --blocks 2

ViT-B width (768, 12 heads, MLP 3072), `--blocks` parallel blocks, patch 16, batch 1, fp32
on the CPU, one thread per process unless --threads says otherwise. Each type runs the
same blocks on the same input: `full`; `window` (14x14 windows, every block; ViTDet uses
14 at 1024 px); `window+global` (ViTDet's pattern: windows with the last block global);
`local-global` (windows + one global token per window); `linear`. Time: the median of
`--repeats` forward + backward passes (after one warm-up); memory: the bytes autograd
keeps for backward (`SavedTensorMeter`, each storage once), per block. Ratios are against
`full` at the same size.

Not measured here yet (issue 18 asks for them): accuracy on `--dataset mnist-canvas` per
type at one training budget, and segment-anything's ImageEncoderViT blocks as a second
peer (segment-anything is not in either venv yet).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

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




def measure(kind: str, size: int, blocks: int, repeats: int) -> tuple[float, float]:
    """(median seconds of forward + backward, bytes kept per block) of `kind` at `size` px."""
    flags = dict(TYPES[kind])
    if kind == "window+global":
        flags["global_attention_layers"] = str(blocks - 1)
    side = size // 16
    if "window_size" in flags:
        flags["window_size"] = min(flags["window_size"], side)
    cfg = preset_model_config("vit-b", num_layers=blocks, img_h=size, img_w=size,
                              num_classes=0, **flags)
    pstate = serial_state()
    model = build_vit(cfg, Runtime(pstate.tp), seed=0)
    model.train()
    x = torch.randn(cfg.seq_length, 1, cfg.hidden_size, requires_grad=True)
    exclude = [*model.parameters(), *model.buffers()]
    times = []
    for r in range(repeats + 1):
        start = time.perf_counter()
        if r == 0:
            with SavedTensorMeter(exclude) as meter:
                out = model.run_blocks(x, None)
        else:
            out = model.run_blocks(x, None)
        out.square().mean().backward()
        if r:
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        x.grad = None
    return statistics.median(times), meter.bytes / blocks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 512],
                   help="image sizes in px (patch 16)")
    p.add_argument("--blocks", type=int, default=2, help="blocks of ViT-B width")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per type and size")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args(argv)
    if any(s % 16 or s < 32 for s in args.sizes):
        print("attention_variants: --sizes must be multiples of 16, at least 32",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; fp32, "
          f"{args.threads} thread(s)")
    print(f"command: python benchmarks/attention_variants.py --sizes "
          f"{' '.join(map(str, args.sizes))} --blocks {args.blocks} --repeats {args.repeats}")
    print("| px | tokens | type | fwd+bwd s | x full | saved MiB / block | x full |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        base = None
        for kind in TYPES:
            seconds, saved = measure(kind, size, args.blocks, args.repeats)
            base = base or (seconds, saved)
            print(f"| {size} | {(size // 16) ** 2} | {kind} | {seconds:.3f} | "
                  f"{seconds / base[0]:.2f} | {saved / 2**20:.1f} | {saved / base[1]:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
