"""Pipeline bubble: each stage's idle time in real gloo runs against (P-1)/(v*m+P-1), and
the zero-bubble schedule's (ZB-H1) beside 1F1B's.

    .venv/bin/python -m benchmarks.pipeline_bubble             # P=2, m in 2 4 8, v in 1 2,
                                                               # and ZB-H1 at each m
    .venv/bin/python -m benchmarks.pipeline_bubble --stages 4  # 4 processes

P gloo processes (one thread each) run the training step of a ViT with --layers blocks of
ViT-S width (196 tokens, micro-batches of --micro-batch images) split evenly over the
stages. A stage's idle time is the time it spends blocked waiting for a message inside the
schedule, plus the time before it starts and after it ends within the common window (all
stages start together after a barrier; the window ends when the last stage finishes); its
bubble is idle / the window, median over the timed steps. The
theory assumes equal stages and free messages: the first stage also embeds and the last
also pools and computes the loss, and messages cost something on loopback, so measured
bubbles sit a little above it. With more processes than cores the stages also wait for a
core, which this measurement cannot tell from waiting for a message.

ZB-H1 rows (--pipeline-schedule zb-h1): the theory column is (P-1)/(P-1+3m), the paper's
idle time with forward, input-gradient and weight-gradient passes of equal length; the
window column compares the step's length with 1F1B's at the same m (the schedule's point:
the same work in less time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys


import torch

from megavit.config import Config, DataConfig, ParallelConfig, TrainingConfig, preset_model_config
from megavit.parallel.schedules import theoretical_bubble
from megavit.tasks.classification import classification_run


def measure(pstate, layers: int, micro: int, m: int, v: int, steps: int,
            schedule: str = "auto") -> dict:
    pp = pstate.pp.size
    per_virtual = layers // pp // v if v > 1 else None
    cfg = Config(
        model=preset_model_config("vit-s", num_layers=layers, num_classes=10),
        parallel=ParallelConfig(pipeline_model_parallel_size=pp,
                                num_layers_per_virtual_pipeline_stage=per_virtual,
                                pipeline_schedule=schedule),
        training=TrainingConfig(micro_batch_size=micro, global_batch_size=micro * m,
                                train_iters=steps + 1, lr=1e-4),
        data=DataConfig(dataset="synthetic", synthetic_size=micro * m * (steps + 1)))
    run = classification_run(cfg, pstate)
    steps_seen = []
    for it, batch in enumerate(run.batches(0, steps + 1)):
        torch.distributed.barrier()          # the stages start the schedule together
        stats = run.step(it, batch).stats
        if it:   # the first step warms up
            steps_seen.append((stats.started, stats.ended, stats.idle_seconds))
    return {"steps": steps_seen}


def bubbles(per_stage: list[dict]) -> tuple[list[float], float]:
    """Each stage's idle fraction of the common window (first start to last end): waiting
    for messages inside its schedule, plus before it starts and after it ends. Median over
    steps; also the median window."""
    fractions, windows = [[] for _ in per_stage], []
    for step in zip(*(stage["steps"] for stage in per_stage)):
        start, end = min(s for s, _, _ in step), max(e for _, e, _ in step)
        windows.append(end - start)
        for k, (s, e, idle) in enumerate(step):
            fractions[k].append((idle + (s - start) + (end - e)) / (end - start))
    return [statistics.median(f) for f in fractions], statistics.median(windows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=2, help="pipeline stages P (default 2)")
    p.add_argument("--layers", type=int, default=8, help="blocks (default 8)")
    p.add_argument("--micro-batch", type=int, default=2, help="images per micro-batch (default 2)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8],
                   help="m values (default 2 4 8)")
    p.add_argument("--virtual", type=int, nargs="+", default=[1, 2], help="v values (default 1 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (default 3)")
    p.add_argument("--no-zero-bubble", action="store_true",
                   help="leave out the ZB-H1 rows")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from tests.harness import run_distributed

    P = args.stages
    rows = [(m, v, "auto") for v in args.virtual for m in args.micro_batches
            if (v == 1 or m % P == 0) and args.layers % (P * v) == 0]
    if not args.no_zero_bubble:
        rows += [(m, 1, "zb-h1") for m in args.micro_batches]
    jobs = {f"m{m}v{v}{s}": (measure, (args.layers, args.micro_batch, m, v, args.steps, s))
            for m, v, s in rows}
    results = run_distributed(P, 1, jobs, timeout=3600, pp=P)
    print(f"# pipeline_bubble: {P} stages x 1 thread (gloo), {args.layers} blocks of ViT-S width, "
          f"196 tokens, micro-batch {args.micro_batch}, fp32; bubble = idle time / common "
          f"window, median of {args.steps} steps")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}; command: python -m benchmarks.pipeline_bubble "
          f"{' '.join(argv or sys.argv[1:])}")
    header = " | ".join(f"stage {k}" for k in range(P))
    print(f"| schedule | m | v | theory | {header} | window s | window / 1F1B's |")
    print("|---|---|---|---|" + "---|" * P + "---|---|")
    one_f_one_b = {m: bubbles(results[f"m{m}v1auto"])[1] for m, v, s in rows
                   if v == 1 and s == "auto"}
    for m, v, s in rows:
        fractions, window = bubbles(results[f"m{m}v{v}{s}"])
        stages = " | ".join(f"{b:.3f}" for b in fractions)
        name = "ZB-H1" if s == "zb-h1" else "interleaved" if v > 1 else "1F1B"
        theory = (P - 1) / (P - 1 + 3 * m) if s == "zb-h1" else theoretical_bubble(m, P, v)
        ratio = f"{window / one_f_one_b[m]:.3f}" if m in one_f_one_b else "-"
        print(f"| {name} | {m} | {v} | {theory:.3f} | {stages} | {window:.2f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
