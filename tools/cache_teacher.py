"""Run a teacher once over every image a student run will see and store its top-K logits
(and, with --pooled-features, its pooled features), so students train from the cache at any
layout without running the teacher.

    python tools/cache_teacher.py --output runs/teacher-cache --top-k 10 \\
        --teacher-checkpoint runs/teacher  <the student's python -m megavit.distill flags>
    python -m megavit.distill ... --distill-cache runs/teacher-cache

The images are the student's: its --dataset, --augment, --seed, --global-batch-size,
--micro-batch-size, image size and --train-iters give the same augmented images in the same
micro-batches (every draw is keyed by the image's global id), and the teacher runs on each
micro-batch as it would online. The rows go to OUTPUT/shard_*.safetensors, --shard-iterations
iterations a shard (megavit/tasks/distillation/cache.py has the format), each written whole
and renamed; OUTPUT/cache.json records what the cache fits and which shards are complete.
Run again after an interruption (or with a larger --train-iters) to write only what is
missing; a cache of another teacher or other data in OUTPUT is refused, naming the field.
Prints a progress line per shard and the teacher's held-out accuracy (stored for the
student's summary). Exit status 2 with a message for a bad flag, teacher or cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from types import SimpleNamespace

PROG = "tools/cache_teacher.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                description=__doc__.split("\n")[0],
                                epilog="Every other flag is python -m megavit.distill's "
                                       "(see its --help).")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="the cache directory (created; an existing cache is continued)")
    p.add_argument("--top-k", type=int, default=10, metavar="K",
                   help="logits kept per image, largest first (the class count keeps all)")
    p.add_argument("--shard-iterations", type=int, default=100, metavar="N",
                   help="training iterations per shard file")
    p.add_argument("--pooled-features", action="store_true",
                   help="also store the teacher's pooled features per image (what its "
                        "classifier reads; float32, the teacher's width), for a student's "
                        "--distill-pooled-weight (implied when the student flags give one)")
    args, rest = p.parse_known_args(argv)
    from megavit.errors import UserError

    try:
        return write_cache(args, rest)
    except (UserError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def write_cache(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from megavit.checkpointing.inference import load_frozen_classifier
    from megavit.config import ConfigError
    from megavit.config.distillation import parse_distillation_args, validate_distillation
    from megavit.data.sampler import GlobalBatchSampler
    from megavit.data.targets import primary_labels
    from megavit.parallel.state import serial_state
    from megavit.tasks.classification import ClassificationTask
    from megavit.tasks.distillation.cache import (CacheManifest, TeacherCacheError,
                                                  cache_identity, write_shard)
    from megavit.tasks.distillation.task import DistillationTask, teacher_reference
    from megavit.data.sampler import eval_batches

    cfg = parse_distillation_args(rest)
    # the student's layout flags may be given: the cache does not depend on them, and the
    # tool runs the teacher in this one process
    cfg.base.parallel = dataclasses.replace(
        cfg.base.parallel, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False)
    validate_distillation(cfg)
    d = cfg.distillation
    if d.distill_cache:
        raise ConfigError("--distill-cache: this tool writes the cache (--output)")
    if d.distill_feature_pairs or d.distill_relation_pairs:
        raise ConfigError("--distill-feature-pairs / --distill-relation-pairs: the cache "
                          "holds the teacher's logits and pooled features only (those terms "
                          "need it online)")
    if args.top_k < 1 or args.shard_iterations < 1:
        raise ConfigError(f"--top-k {args.top_k} / --shard-iterations "
                          f"{args.shard_iterations}: both must be at least 1")
    pstate = serial_state()
    task = DistillationTask(cfg)
    base = task.prepare(pstate)
    classes = base.model.num_classes
    top_k = min(args.top_k, classes)
    task.teacher = load_frozen_classifier(Path(cfg.distillation.teacher_checkpoint), pstate,
                                          here=True)
    reference = teacher_reference(cfg.distillation.teacher_checkpoint)
    pooled = args.pooled_features or d.distill_pooled_weight > 0
    identity = cache_identity(base, reference["teacher_config_sha256"], top_k, task.recipe,
                              pooled)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    try:
        manifest = CacheManifest.read(root)
    except TeacherCacheError:
        if any(root.iterdir()):
            raise TeacherCacheError(f"--output {root}: holds files but no teacher cache "
                                    "manifest; choose an empty directory") from None
        manifest = None
    if manifest is not None and (differ := manifest.differences(identity) + [
            f"{k}: {manifest.identity.get(k, False)!r} in the cache, {identity[k]!r} here"
            for k in ("top_k", "pooled_features")
            if manifest.identity.get(k, False) != identity[k]]):
        hint = (" (a cache with or without pooled features cannot be changed into the "
                "other: write it to a new --output)"
                if any(d.startswith("pooled_features") for d in differ) else "")
        raise TeacherCacheError(f"--output {root}: a cache of another teacher or other data: "
                                + "; ".join(differ) + hint)
    if manifest is None:        # the teacher's held-out accuracy, once
        hits = count = 0
        t = base.training
        with torch.no_grad():
            for micro_batches in eval_batches(task.heldout, t.global_batch_size, 0, 1,
                                              t.micro_batch_size, base.logging.eval_iters):
                for mb in micro_batches:
                    logits = task.teacher_logits(mb.images, torch.float32)
                    hits += int((logits.argmax(-1) == primary_labels(mb.labels)).sum())
                    count += len(mb.labels)
        manifest = CacheManifest(identity, task.teacher.info["model"], hits / max(count, 1))
        manifest.write(root)
    dropped = [first for first, n in manifest.shards.items()
               if not shard_reads(root, first, n * base.training.global_batch_size,
                                  manifest.shard_keys)]
    for first in dropped:      # missing or damaged: written again below
        del manifest.shards[first]
    iterations = base.training.train_iters
    view = SimpleNamespace(pstate=pstate, is_first_stage=True,
                           sampler=GlobalBatchSampler(task.train_size,
                                                      base.training.global_batch_size,
                                                      base.training.seed))
    todo = [first for first in range(0, iterations, args.shard_iterations)   # (or shorter
            if manifest.shards.get(first, 0) < min(first + args.shard_iterations,  # than
                                                   iterations) - first]            # needed)
    print(f"cache_teacher | teacher {reference['teacher_checkpoint']} | held-out accuracy "
          f"{manifest.teacher_accuracy:.4f} | iterations {iterations} | top-k {top_k} of "
          f"{classes}{' | pooled features' if pooled else ''} | shards to write {len(todo)} of "
          f"{-(-iterations // args.shard_iterations)}"
          + (f" | rewriting {len(dropped)} missing or damaged" if dropped else ""), flush=True)
    started = time.perf_counter()
    for done, first in enumerate(todo, 1):
        stop = min(first + args.shard_iterations, iterations)
        ids, values, indices, features = [], [], [], []
        for micro_batches in ClassificationTask.batches(task, view, first, stop):
            for mb in micro_batches:
                if pooled:
                    logits, f = task.teacher_logits_and_pooled(mb.images, torch.float32)
                    features.append(f)
                else:
                    logits = task.teacher_logits(mb.images, torch.float32)
                v, i = logits.topk(top_k, dim=-1)
                ids.append(mb.sample_ids)
                values.append(v)
                indices.append(i)
        write_shard(root, first, stop - first, torch.cat(ids), torch.cat(values),
                    torch.cat(indices), torch.cat(features) if pooled else None)
        manifest.shards[first] = stop - first
        manifest.write(root)
        elapsed = time.perf_counter() - started
        print(f"cache_teacher | shard {done}/{len(todo)} | iterations {first}-{stop - 1} | "
              f"images {len(torch.cat(ids))} | {elapsed:.1f} s", flush=True)
    print(f"cache_teacher | done | {root} | shards {len(manifest.shards)}", flush=True)
    return 0


def shard_reads(root: Path, first: int, rows: int, keys: tuple[str, ...]) -> bool:
    """Whether shard `first` is there and reads whole: `rows` rows of each of `keys`."""
    from megavit.tasks.distillation.cache import shard_name

    try:
        from safetensors.torch import load_file

        tensors = load_file(str(root / shard_name(first)))
        return all(tensors[k].shape[0] == rows for k in keys)
    except Exception:          # noqa: BLE001 — missing, truncated, not safetensors
        return False


if __name__ == "__main__":
    sys.exit(main())
