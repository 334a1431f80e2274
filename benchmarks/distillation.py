"""What online distillation costs over training the student alone, measured in one run.

    python -m benchmarks.distillation                      # CPU, fp32, serial
    python -m benchmarks.distillation --steps 6 --batch 32

The student and the teacher are ViT-22B-style classifiers on 32x32 synthetic images
(patch 4: 64 tokens, 10 classes); the teacher (random weights, saved once to a temporary
checkpoint) is 4.7x the student's forward FLOPs by default (twice the width, 5 blocks to 4). Rows, each the
real training step of the engine (`Run.step`, AdamW; the data iterator included, since the
teacher runs there):

    student alone            python -m megavit.pretrain's classification task
    + response (online)      python -m megavit.distill, --distill-loss soft: the teacher's
                             forward on every micro-batch
    + response + feature     ... and --distill-feature-pairs L-1:L-1 (the last blocks'
                             maps, projected)
    + response (cache)       --distill-cache: the teacher's logits (K = all 10) read from a
                             cache tools/cache_teacher.py wrote before the timing (its
                             writing time is printed apart, a one-off cost)

Per row: the median step time over `--steps` steps after two warm-up steps, its ratio to
the student alone, and the bytes autograd keeps for backward during one step (its
storages, parameters excluded): the teacher runs without gradients, so it should add
nothing but the feature term's maps. The target (the issue's): the online overhead is at
most the teacher's forward FLOPs as a share of the student's training step (3x its forward).
Megatron-LM reports up to 40 % extra for its online distillation (another model pair).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from megavit.checkpointing.checkpointer import save_checkpoint
from megavit.config import parse_args
from megavit.config.distillation import parse_distillation_args
from megavit.parallel.memory import SavedTensorMeter
from megavit.parallel.state import serial_state
from megavit.tasks.classification import classification_run
from megavit.tasks.distillation.task import DistillationTask
from megavit.training.peak_flops import cpu_name
from megavit.training.run import Run


def model_flags(width: int, layers: int) -> list[str]:
    return ["--dataset", "synthetic", "--img-h", "32", "--img-w", "32", "--num-channels", "3",
            "--patch-dim", "4", "--num-classes", "10", "--hidden-size", str(width),
            "--num-layers", str(layers), "--num-attention-heads", str(max(width // 32, 1)),
            "--ffn-hidden-size", str(4 * width), "--pooling", "gap", "--seed", "3"]


def step_times(run, steps: int) -> tuple[list[float], int]:
    """Seconds of each step after two warm-up steps, and the bytes autograd keeps during
    the first warm-up step."""
    times, meter = [], SavedTensorMeter(list(run.model.parameters()))
    batches = run.batches(0, steps + 2)
    for it in range(steps + 2):
        start = time.perf_counter()
        micro = next(batches)
        if it == 0:
            with meter:
                run.step(it, micro)
        else:
            run.step(it, micro)
        if it >= 2:
            times.append(time.perf_counter() - start)
    return times, meter.bytes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--student-width", type=int, default=128)
    p.add_argument("--teacher-width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4, help="the student's blocks")
    p.add_argument("--teacher-layers", type=int, default=5, help="the teacher's blocks")
    p.add_argument("--batch", type=int, default=32, help="global batch (one micro-batch)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = ["--micro-batch-size", str(args.batch), "--global-batch-size", str(args.batch),
              "--train-iters", str(args.steps + 2), "--lr", "1e-4", "--progress-bar", "off"]
    student = model_flags(args.student_width, args.layers) + common
    teacher_flags = model_flags(args.teacher_width, args.teacher_layers) + common
    teacher_cfg = parse_args(teacher_flags)
    last = args.layers - 1
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(classification_run(teacher_cfg, serial_state()), tmp, 0, 0,
                        lambda line: None)
        from tools.cache_teacher import main as cache_teacher

        cache = os.path.join(tmp, "cache")
        started = time.perf_counter()
        if cache_teacher(["--output", cache, "--top-k", "10", "--teacher-checkpoint", tmp,
                          *student]) != 0:
            raise SystemExit("tools/cache_teacher.py failed")
        cache_seconds = time.perf_counter() - started
        runs = {
            "student alone": lambda: classification_run(parse_args(student), serial_state()),
            "+ response (online)": lambda: Run.build(DistillationTask(parse_distillation_args(
                student + ["--teacher-checkpoint", tmp])), serial_state()),
            "+ response + feature": lambda: Run.build(DistillationTask(parse_distillation_args(
                student + ["--teacher-checkpoint", tmp, "--distill-feature-pairs",
                           f"{last}:{last}"])), serial_state()),
            "+ response (cache)": lambda: Run.build(DistillationTask(parse_distillation_args(
                student + ["--distill-cache", cache])), serial_state()),
        }
        rows = {}
        for name, build in runs.items():
            run = build()
            times, kept = step_times(run, args.steps)
            rows[name] = (statistics.median(times), kept)
        flops = {"student": parse_args(student), "teacher": teacher_cfg}
    from megavit.models.vit import vit_flops

    student_step = vit_flops(flops["student"].model, args.batch, training=True)
    teacher_fwd = vit_flops(flops["teacher"].model, args.batch, training=False)
    share = teacher_fwd / student_step
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; fp32, "
          f"{args.threads} thread(s); batch {args.batch}, 32x32 px, patch 4; student "
          f"{args.layers} blocks of width {args.student_width}, teacher {args.teacher_layers} "
          f"of {args.teacher_width}")
    print(f"command: python -m benchmarks.distillation --student-width {args.student_width} "
          f"--teacher-width {args.teacher_width} --layers {args.layers} --teacher-layers "
          f"{args.teacher_layers} --batch {args.batch} "
          f"--steps {args.steps}")
    print(f"teacher forward FLOPs / student training-step FLOPs: {share:.2f} (teacher forward "
          f"{teacher_fwd / vit_flops(flops['student'].model, args.batch, training=False):.1f}x"
          " the student's)")
    print(f"writing the cache for {args.steps + 2} steps: {cache_seconds:.2f} s (once)")
    base = rows["student alone"][0]
    print("| run | step s | x student alone | kept for backward MB | overhead <= FLOPs share |")
    print("|---|---|---|---|---|")
    for name, (seconds, kept) in rows.items():
        ratio = seconds / base
        verdict = "-" if name == "student alone" else (
            "met" if ratio - 1 <= share else "missed")
        print(f"| {name} | {seconds:.3f} | {ratio:.2f} | {kept / 2**20:.1f} | {verdict} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
