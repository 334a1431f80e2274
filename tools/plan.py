"""Which layout fits and runs fastest: megavit's planner on paper.

    python tools/plan.py --preset vit-22b --num-classes 1000 --gpu h100-sxm --num-gpus 256 \\
        --global-batch-size 4096                         # search, ranked table
    python tools/plan.py --preset vit-22b --num-classes 1000 --num-gpus 256 \\
        --global-batch-size 4096 --layout --tensor-model-parallel-size 2 \\
        --pipeline-model-parallel-size 16 --sequence-parallel --use-distributed-optimizer
    python tools/plan.py --model-kind gpt --num-layers 96 --hidden-size 12288 \\
        --num-attention-heads 96 --seq-length 2048 --vocab-size 51200 --gpu a100-80gb \\
        --num-gpus 1536 --global-batch-size 2304 --json

The model and layout flags are megavit.pretrain's (`--preset`, `--num-layers`,
`--hidden-size`, `--num-attention-heads`, `--ffn-hidden-size`, `--tensor-model-parallel-size`,
`--pipeline-model-parallel-size`, `--num-layers-per-virtual-pipeline-stage`,
`--sequence-parallel`, `--recompute-granularity`, `--micro-batch-size`,
`--use-distributed-optimizer`, `--global-batch-size`, `--bf16` / `--fp16`). Without
`--layout` every layout is searched (megavit/planner/search.py) and the fastest that fit are
printed with their memory per GPU by component; with it, the layout the flags give is
evaluated. Predictions come from megavit/planner (docs/planner.md: what is checked against
runs and published measurements, and how far off it is). Exit status 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import json
import sys

PROG = "tools/plan.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                description=__doc__.split("\n")[0],
                                epilog="Every other flag is python -m megavit.pretrain's "
                                       "(model, layout, batch, precision).")
    p.add_argument("--gpu", default="h100-sxm", metavar="NAME|FILE.json",
                   help="a packaged GPU spec (megavit/planner/gpus/: a100-80gb, h100-sxm, "
                        "h200) or your own JSON file with the same fields")
    p.add_argument("--num-gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpus-per-node", type=int, default=8,
                   help="GPUs sharing a node's fabric (NVLink); TP stays inside a node")
    p.add_argument("--model-kind", choices=("vit", "gpt"), default="vit",
                   help="'vit': the megavit model the flags describe; 'gpt': a GPT decoder "
                        "(Megatron's) of --num-layers / --hidden-size / "
                        "--num-attention-heads, --seq-length and --vocab-size, to compare "
                        "with published LLM runs")
    p.add_argument("--seq-length", type=int, help="tokens per sample (--model-kind gpt)")
    p.add_argument("--vocab-size", type=int, help="vocabulary (--model-kind gpt)")
    p.add_argument("--layout", action="store_true",
                   help="evaluate the layout the training flags give instead of searching")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--with-full-sharding", action="store_true",
                   help="also search full sharding (--data-parallel-sharding-strategy full: "
                        "FSDP2 / ZeRO-3 over DP, one unit per block; doubles the search); "
                        "with --layout, the same as --data-parallel-sharding-strategy full")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per layout (step_time_s, mfu, memory_gib_per_gpu, "
                        "...) instead of the table")
    args, rest = p.parse_known_args(argv)
    from megavit.errors import UserError

    try:
        return plan(args, rest)
    except (UserError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def plan(args: argparse.Namespace, rest: list[str]) -> int:
    from megavit.config import ConfigError, parse_args
    from megavit.planner.hardware import load_gpu
    from megavit.planner.search import MEMORY_FRACTION, PlannedModel, evaluate, search
    from megavit.planner.step_time import PlanLayout

    cfg = parse_args(rest)
    gpu = load_gpu(args.gpu)
    if args.num_gpus < 1 or args.gpus_per_node < 1:
        raise ConfigError("--num-gpus and --gpus-per-node must be at least 1")
    precision = "fp16" if cfg.precision.fp16 else "bf16"
    if args.model_kind == "gpt":
        if not args.seq_length or not args.vocab_size:
            raise ConfigError("--model-kind gpt needs --seq-length and --vocab-size")
        m = cfg.model
        model = PlannedModel.gpt(m.num_layers, m.hidden_size, m.num_attention_heads,
                                 args.seq_length, args.vocab_size, m.ffn_hidden_size)
        what = (f"GPT {m.num_layers} layers, hidden {m.hidden_size}, heads "
                f"{m.num_attention_heads}, seq {args.seq_length}, vocab {args.vocab_size}")
    else:
        if cfg.model.num_classes is None:
            raise ConfigError("--num-classes: the classifier's size changes the plan; give it")
        model = PlannedModel.vit(cfg)
        m = cfg.model
        what = (f"ViT {cfg.preset or 'custom'}: {m.num_layers} blocks, hidden "
                f"{m.hidden_size}, heads {m.num_attention_heads}, MLP {m.ffn_hidden_size}, "
                f"{m.seq_length} tokens, {m.num_classes} classes")
    batch = cfg.training.global_batch_size
    header = [f"plan | {what} | global batch {batch} | {args.num_gpus} x {gpu.name} "
              f"({args.gpus_per_node} a node) | {precision}",
              f"plan | step-time constants: {gpu.efficiency_note} | fits: predicted memory "
              f"<= {MEMORY_FRACTION:.0%} of {gpu.memory_bytes / 2**30:.1f} GiB"]
    if args.layout:
        par = cfg.parallel
        tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
        if args.num_gpus % (tp * pp):
            raise ConfigError(f"--num-gpus {args.num_gpus} is not a multiple of TP {tp} x "
                              f"PP {pp}")
        if par.pipeline_schedule == "zb-h1":
            raise ConfigError("--pipeline-schedule zb-h1: the planner's step time models "
                              "1F1B and interleaved schedules only; plan without it")
        if par.recompute_granularity == "auto":
            raise ConfigError("--recompute-granularity auto: plan none, selective or full")
        if par.recompute_granularity == "full" and (par.recompute_method == "block" or
                                                    (par.recompute_num_layers or 1) > 1):
            raise ConfigError("--recompute-method / --recompute-num-layers: the planner "
                              "models full recomputation of every block on its own "
                              "(--recompute-method uniform --recompute-num-layers 1)")
        if (par.num_layers_in_first_pipeline_stage is not None
                or par.num_layers_in_last_pipeline_stage is not None):
            raise ConfigError("--num-layers-in-first/last-pipeline-stage: the planner "
                              "plans even splits only")
        dp = args.num_gpus // (tp * pp)
        full = args.with_full_sharding or par.data_parallel_sharding_strategy == "full"
        chunks = (model.shape.layers // pp // par.num_layers_per_virtual_pipeline_stage
                  if par.num_layers_per_virtual_pipeline_stage else 1)
        layout = PlanLayout(tp, pp, dp, chunks, par.sequence_parallel and tp > 1,
                            par.recompute_granularity or "none",
                            cfg.training.micro_batch_size, batch,
                            par.use_distributed_optimizer and not full,
                            full_sharding=full and dp > 1)
        if batch % (layout.micro_batch * dp):
            raise ConfigError(f"--global-batch-size {batch} is not a multiple of "
                              f"--micro-batch-size {layout.micro_batch} x DP {dp}")
        results = [evaluate(model, layout, gpu, args.gpus_per_node, precision)]
        total = 1
    else:
        def progress(done: int, total: int) -> None:
            print(f"plan | evaluated {done} of {total} layouts", file=sys.stderr, flush=True)
        results = search(model, gpu, args.num_gpus, args.gpus_per_node, batch, precision,
                         progress, full_sharding=args.with_full_sharding)
        total = len(results)
        if not results:
            raise ConfigError(f"no layout of this model divides {args.num_gpus} GPUs and "
                              f"global batch {batch} (TP must divide the heads, PP the "
                              "blocks, DP the batch)")
    if args.json:
        for c in results[:args.top] if not args.layout else results:
            print(json.dumps(c.to_json()))
        return 0
    for line in header:
        print(line)
    fitting = sum(c.fits for c in results)
    if not args.layout:
        print(f"plan | {total} layouts searched, {fitting} fit; the fastest {min(args.top, total)}:")
    print("| # | TP | PP | v | DP | SP | recompute | micro | sharding | step s | samples/s | "
          "MFU | params | grads | optimizer | activations | gathered | total GiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, c in enumerate(results[:args.top], 1):
        lay, mem = c.layout, {k: v / 2**30 for k, v in c.memory.items()}
        print(f"| {i} | {lay.tp} | {lay.pp} | {lay.chunks} | {lay.dp} | "
              f"{'on' if lay.sequence_parallel else 'off'} | {lay.recompute} | "
              f"{lay.micro_batch} | {sharding(lay)} | "
              f"{c.step.step_s:.3f} | {c.samples_per_second:,.0f} | {c.mfu:.1%} | "
              f"{mem['parameters']:.1f} | {mem['gradients']:.1f} | {mem['optimizer']:.1f} | "
              f"{mem['activations']:.1f} | {mem.get('gathered', 0.0):.1f} | "
              f"{mem['total']:.1f} | "
              f"{'yes' if c.fits else 'NO'} |")
    best = results[0]
    print("plan | time of #1: " + ", ".join(f"{k} {v:.3f} s" for k, v in
                                            best.step.parts.items()))
    return 0


def sharding(layout) -> str:
    if layout.full_sharding:
        return "full (FSDP2)"
    return "ZeRO-1" if layout.distributed_optimizer else "none"


if __name__ == "__main__":
    sys.exit(main())
