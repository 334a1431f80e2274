"""Parameters, FLOPs and optimizer memory of a model, per rank, on paper.

    python tools/model_summary.py                          # every preset, one rank
    python tools/model_summary.py --preset vit-22b --tensor-model-parallel-size 8 \
        --pipeline-model-parallel-size 4
    python tools/model_summary.py --preset vit-22b --tensor-model-parallel-size 8 \
        --pipeline-model-parallel-size 6 --num-layers-per-virtual-pipeline-stage 4

Takes the model flags of `megavit.pretrain` and its layout flags. With
--patch-merge-layers the tokens column gives each stage's input length (per chunk); with
--feature-layers, "+ n" the tokens of the feature maps the stage receives with them (they
travel to the last stage for a dense head). Every rank's part is built on the meta
device, so even ViT-22B costs no memory. "train state" is fp32 weights, gradients and two
Adam moments: 16 bytes per parameter held by the rank. A rank "owns" its
shards, and the replicated parameters if it is TP rank 0: owned parameters summed over all
ranks give the serial model's count.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from megavit.config import PRESETS, flag_names, parse_args, validate
from megavit.errors import UserError
from megavit.models.transformer import Runtime
from megavit.models.vit import VisionTransformer, vit_flops
from megavit.parallel.comm import CommStats, Group
from megavit.planner.memory import stage_on_meta


def rank_counts(model_cfg, layout, tp: int) -> list[dict]:
    """Per (stage, TP rank): blocks, parameters held, parameters owned."""
    rows = []
    for stage in range(layout.stages):
        for tp_rank in range(tp):
            named = list(stage_on_meta(model_cfg, layout, stage, tp, tp_rank).named_parameters())
            held = sum(p.numel() for _, p in named)
            owned = sum(p.numel() for _, p in named
                        if getattr(p, "tp_shard", None) is not None or tp_rank == 0)
            rows.append({"stage": stage, "tp_rank": tp_rank, "held": held, "owned": owned,
                         "names": {n for n, _ in named},
                         "blocks": [len(layout.chunk_layers(stage, c))
                                    for c in range(layout.chunks)]})
    return rows


def serial_count(model_cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in VisionTransformer(model_cfg, Runtime(
            Group.single("tp", CommStats()))).parameters())


def main(argv: list[str] | None = None) -> int:
    from megavit.training.run import pipeline_layout

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = parse_args(argv)
        tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
        validate(cfg, world_size=tp * pp)
        model_flags = set(flag_names("model")) | {"--preset"}
        if any(a.split("=")[0] in model_flags for a in argv):
            models = [(cfg.preset or "custom", cfg.model)]
        else:  # no model chosen: every preset
            models = [(name, parse_args(["--preset", name]).model) for name in PRESETS]
        models = [(n, dataclasses.replace(m, num_classes=m.num_classes if m.num_classes
                                          is not None else 1000)) for n, m in models]
        layouts = [pipeline_layout(dataclasses.replace(cfg, model=m)) for _, m in models]
    except UserError as e:     # a flag mistake, a pipeline split that does not work
        print(f"model_summary: error: {e}", file=sys.stderr)
        return 2
    print(f"| model | tokens | parameters | stage: blocks | params / rank (TP={tp}) "
          f"| GFLOPs / image (fwd) | train state / rank |")
    print("|---|---|---|---|---|---|---|")
    for (name, m), layout in zip(models, layouts):
        if m.num_attention_heads % tp or m.ffn_hidden_size % tp:
            print(f"| {name} | - | - | - | TP={tp} does not divide its heads/MLP | - | - |")
            continue
        total = serial_count(m)
        by_stage = {r["stage"]: r for r in rank_counts(m, layout, tp) if r["tp_rank"] == 0}
        for stage, r in by_stage.items():
            blocks = "+".join(str(n) for n in r["blocks"])
            # with --patch-merge-layers each stage's chunks start at their own length
            tokens = ("/".join(received_tokens(m, layout.chunk_layers(stage, c)[0])
                               for c in range(layout.chunks))
                      if m.patch_merge_layers or m.feature_layers else
                      m.seq_length if stage == 0 else "")
            print(f"| {name if stage == 0 else ''} | {tokens} | "
                  f"{f'{total / 1e6:,.1f} M' if stage == 0 else ''} | {stage}: {blocks} | "
                  f"{r['held'] / 1e6:,.1f} M | "
                  f"{f'{vit_flops(m, 1, training=False) / 1e9:,.1f}' if stage == 0 else ''} | "
                  f"{r['held'] * 16 / 2**30:,.1f} GiB |")
    return 0


def received_tokens(m, first: int) -> str:
    """The tokens a part starting at block `first` receives: 's' or, with feature maps
    carried from earlier blocks, 's+f'."""
    carried = sum(m.at_layer(l).seq_length for l in m.feature_layer_list() if l < first)
    s = m.at_layer(first).seq_length
    return f"{s}+{carried}" if carried else str(s)


if __name__ == "__main__":
    sys.exit(main())
