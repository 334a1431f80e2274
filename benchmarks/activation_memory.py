"""Activation memory per block: measured against the formula of docs/activation_memory.md.

    .venv/bin/python -m benchmarks.activation_memory            # all rows (~1 min, 2 cores)
    .venv/bin/python -m benchmarks.activation_memory --quick    # fewer shapes

For each shape, block type, TP size (real gloo processes, one per rank), sequence-parallel
mode and recomputation setting, the blocks run forward once under a saved-tensors meter
(each storage counted once, parameters and buffers excluded) and the bytes kept per block
per micro-batch are compared with `block_activation_bytes`. Target: every row within 2 %.
Then the bound the docs derive: selective recomputation + SP at TP=t keeps at most the
TP=1 no-recompute figure / t, plus (in "keep" mode) the gathered in_proj input p*s*b*h.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time


import torch

from megavit.config import preset_model_config
from megavit.models.activation_memory import (ActivationSetup, block_activation_bytes,
                                              measure_setup)

SHAPES = {  # name: (hidden, heads, MLP, image, patch, pooling, micro-batch)
    "debug-64tok": (64, 4, 256, 32, 4, "map", 2),
    "debug-50tok-cls": (64, 4, 256, 28, 4, "cls", 2),
    "vit-s-197tok-cls": (384, 6, 1536, 224, 16, "cls", 2),   # 6 heads: TP 1 and 2 only
    # the attention types of issue 18 on a 7 x 7 grid (3 x 3 windows, partial at the edges)
    "debug-49tok-window-shift": (64, 4, 256, 28, 4, "map", 2),
    "debug-50tok-local-global": (64, 4, 256, 28, 4, "cls", 2),
    "debug-49tok-linear-rope": (64, 4, 256, 28, 4, "map", 2),
    "debug-50tok-rope-cls": (64, 4, 256, 28, 4, "cls", 2),
    # issue 19: an 8 x 8 grid and a class token merged after block 0 (65 -> 17 tokens)
    "debug-65tok-merge-cls": (64, 4, 256, 32, 4, "cls", 2),
    "debug-64tok-merge-window": (64, 4, 256, 32, 4, "map", 2),
}
ATTENTION = {  # model flags of the shapes that are not full attention with learned positions
    "debug-49tok-window-shift": dict(attention_type="window", window_size=3, window_shift=True),
    "debug-50tok-local-global": dict(attention_type="local-global", window_size=3),
    "debug-49tok-linear-rope": dict(attention_type="linear", position_embedding_type="rope-2d"),
    "debug-50tok-rope-cls": dict(position_embedding_type="rope-2d"),
    "debug-65tok-merge-cls": dict(patch_merge_layers="0"),
    "debug-64tok-merge-window": dict(patch_merge_layers="0", attention_type="window",
                                     window_size=3),
}
RECOMPUTE = {
    "none": dict(recompute=None),
    "selective": dict(recompute="selective"),
    "full-uniform-1": dict(recompute="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block-1": dict(recompute="full", recompute_method="block", recompute_num_layers=1),
}


def model_cfg(shape: str, block: str):
    h, a, f, img, patch, pooling, _ = SHAPES[shape]
    return preset_model_config("vit-debug", hidden_size=h, num_attention_heads=a,
                               ffn_hidden_size=f, img_h=img, img_w=img, patch_dim=patch,
                               num_layers=2, block_type=block, pooling=pooling, num_classes=10,
                               num_channels=3, **ATTENTION.get(shape, {}))


def rows_for(tp: int, shapes: list[str]) -> list[tuple]:
    """Every combination this TP size can split (heads and MLP divisible by tp)."""
    modes = [None] if tp == 1 else [None, "keep", "regather"]
    return [(shape, block, tp, sp, rc) for shape in shapes
            if SHAPES[shape][1] % tp == 0 and SHAPES[shape][2] % tp == 0
            for block in ("parallel", "sequential") for sp in modes for rc in RECOMPUTE]


def measure_rows(pstate, rows: list[tuple]) -> list[float]:
    out = []
    for shape, block, tp, sp, rc in rows:
        setup = ActivationSetup(tp=tp, micro_batch=SHAPES[shape][6], sequence_parallel=sp,
                                **RECOMPUTE[rc])
        out.append(measure_setup(model_cfg(shape, block), setup, pstate.tp))
    return out


def run_tp(tp: int, rows: list[tuple]) -> list[float]:
    """Measure `rows` on `tp` gloo processes (rank 0's figures; every rank keeps the same)."""
    if tp == 1:
        from megavit.parallel.state import serial_state
        return measure_rows(serial_state(), rows)
    from tests.harness import run_distributed
    return run_distributed(tp, tp, {"rows": (measure_rows, (rows,))})["rows"][0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="only the small shapes")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4], help="TP sizes (default 1 2 4)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    shapes = [s for s in SHAPES if not (args.quick and s.startswith("vit-s"))]
    t0 = time.time()
    results = []
    for tp in args.tp:
        rows = rows_for(tp, shapes)
        results += list(zip(rows, run_tp(tp, rows)))
    print("# activation_memory: bytes kept for backward per block per micro-batch, fp32, "
          "2 blocks; measured in gloo processes vs docs/activation_memory.md")
    print(f"# machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; "
          f"command: python -m benchmarks.activation_memory {' '.join(argv or sys.argv[1:])}")
    print(f"| {'shape':<24} | {'block':<10} | tp | {'SP':<8} | {'recompute':<14} | "
          f"{'measured KiB':>12} | {'formula KiB':>11} | ratio |")
    print(f"|{'-' * 26}|{'-' * 12}|----|{'-' * 10}|{'-' * 16}|{'-' * 14}|{'-' * 13}|-------|")
    worst = 0.0
    by_key = {}
    for (shape, block, tp, sp, rc), got in results:
        setup = ActivationSetup(tp=tp, micro_batch=SHAPES[shape][6], sequence_parallel=sp,
                                **RECOMPUTE[rc])
        want = block_activation_bytes(model_cfg(shape, block), setup)
        worst = max(worst, abs(got / want - 1))
        by_key[(shape, block, tp, sp, rc)] = got
        print(f"| {shape:<24} | {block:<10} | {tp:>2} | {str(sp or '-'):<8} | {rc:<14} | "
              f"{got / 1024:12.1f} | {want / 1024:11.1f} | {got / want:.4f} |")
    print(f"\n{len(results)} rows; largest |measured / formula - 1| = {worst:.2e} "
          f"(target <= 2e-2): {'met' if worst <= 0.02 else 'NOT met'}")
    print("\nselective + SP at TP=t against the TP=1 no-recompute figure / t:")
    for (shape, block, tp, sp, rc), got in sorted(by_key.items(), key=lambda kv: str(kv[0])):
        if rc != "selective" or sp is None:
            continue
        base = by_key[(shape, block, 1, None, "none")] / tp
        h, _, _, _, _, _, b = SHAPES[shape]
        cfg = model_cfg(shape, block)
        s = -(-cfg.seq_length // tp) * tp
        allowance = 4 * s * b * h * (2 if block == "sequential" else 1) if sp == "keep" else 0
        verdict = "ok" if got <= base + allowance else "EXCEEDED"
        print(f"  {shape} {block} t={tp} {sp}: {got / 1024:.1f} KiB <= {base / 1024:.1f} + "
              f"{allowance / 1024:.1f} (gathered input) KiB: {verdict}")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0 if worst <= 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
