"""Parameters, FLOPs and optimizer memory of a model, per tensor-parallel rank, on paper.

    python tools/model_summary.py                          # every preset, TP=1
    python tools/model_summary.py --preset vit-22b --tensor-model-parallel-size 8
    python tools/model_summary.py --preset vit-b --num-layers 6 --img-h 384 --img-w 384

Takes the model flags of `megavit.pretrain` (and --tensor-model-parallel-size). Models are
built on the meta device, so even ViT-22B costs no memory. "train state" is fp32 weights,
gradients and two Adam moments: 16 bytes per parameter held by the rank.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from megavit.config import PRESETS, ConfigError, flag_names, parse_args, validate
from megavit.models.vit import Runtime, VisionTransformer, vit_flops
from megavit.parallel.comm import CommStats, Group


def summarize(model_cfg, tp: int, rank: int = 0) -> dict:
    group = Group("tp", tuple(range(tp)), rank, None, CommStats())
    with torch.device("meta"):
        model = VisionTransformer(model_cfg, Runtime(group))
    local = sum(p.numel() for p in model.parameters())
    full = sum(p.numel() * (tp if getattr(p, "tp_shard", None) else 1) for p in model.parameters())
    return {"params": full, "params_per_rank": local,
            "gflops_fwd": vit_flops(model_cfg, 1, training=False) / 1e9,
            "train_state_gib_per_rank": local * 16 / 2**30}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        tp = cfg.parallel.tensor_model_parallel_size
        validate(cfg, world_size=tp)
    except ConfigError as e:
        print(f"model_summary: error: {e}", file=sys.stderr)
        return 2
    model_flags = set(flag_names("model")) | {"--preset"}
    if any(a.split("=")[0] in model_flags for a in argv):
        rows = [(cfg.preset or "custom", cfg.model)]
    else:  # no model chosen: every preset
        rows = [(name, parse_args(["--preset", name]).model) for name in PRESETS]
    print(f"| model | tokens | parameters | params / rank (TP={tp}) | GFLOPs / image (fwd) "
          f"| train state / rank |")
    print("|---|---|---|---|---|---|")
    for name, m in rows:
        m = dataclasses.replace(m, num_classes=m.num_classes if m.num_classes is not None else 1000)
        if m.num_attention_heads % tp or m.ffn_hidden_size % tp:
            print(f"| {name} | - | - | TP={tp} does not divide its heads/MLP | - | - |")
            continue
        s = summarize(m, tp)
        print(f"| {name} | {m.seq_length} | {s['params'] / 1e6:,.1f} M | "
              f"{s['params_per_rank'] / 1e6:,.1f} M | {s['gflops_fwd']:,.1f} | "
              f"{s['train_state_gib_per_rank']:,.1f} GiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
