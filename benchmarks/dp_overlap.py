"""Data parallelism at DP=2 on gloo: gradient reduction after backward, overlapped with
backward, and the distributed (ZeRO-1) optimizer.

    .venv/bin/python -m benchmarks.dp_overlap                  # ViT-S width, 4 blocks
    .venv/bin/python -m benchmarks.dp_overlap --layers 2 --steps 3

Each configuration trains the same model (vit-s widths, parallel blocks, MAP head, fp32,
synthetic 224x224 images) through megavit's real training step on 2 gloo processes with
one thread each, global batch 16 in micro-batches of 4 (2 per rank and step), buckets of
--bucket-size elements. Each configuration runs in its own process group, so its peak
resident memory is its own, measured in a second pass of 2 steps: reported per rank as the growth of the peak RSS over the RSS
before the model was built (with glibc mapping every allocation over 64 KiB on its own, so
RSS follows live tensors; see `rss_follows_tensors`), next to the exact bytes of parameters, gradient buffer and
optimizer state that megavit accounts for. Step time: median over the timed steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import statistics
import sys
import time


import torch

from megavit.config import Config, DataConfig, TrainingConfig, preset_model_config

CONFIGS = {
    "reduce after backward": {},
    "overlap": {"overlap_grad_reduce": True},
    "dist-opt": {"use_distributed_optimizer": True},
    "dist-opt + overlap": {"use_distributed_optimizer": True, "overlap_grad_reduce": True},
}


def rss_follows_tensors() -> bool:
    """Make this process's resident set follow its live tensors: glibc then serves every
    allocation over 64 KiB by its own mmap and unmaps it when freed (no heap caching, no
    fragmentation), so peak RSS measures peak live memory, the same way for every
    configuration. False where glibc's mallopt is not available."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 * 1024)) and \
            bool(libc.mallopt(m_trim_threshold, 64 * 1024))
    except (OSError, AttributeError):
        return False


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """The peak resident set since the process started or since `reset_peak_rss()`."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak_rss() -> None:
    """Start the peak over from the current resident set (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_config(args, parallel: dict) -> Config:
    model = preset_model_config("vit-s", num_layers=args.layers, img_h=224, img_w=224,
                                num_classes=100)
    cfg = Config(model=model,
                 training=TrainingConfig(micro_batch_size=4, global_batch_size=16,
                                         train_iters=args.warmup + args.steps, lr=1e-4,
                                         adam_impl="foreach"),
                 data=DataConfig(dataset="synthetic", synthetic_size=64))
    cfg.parallel = dataclasses.replace(cfg.parallel, ddp_bucket_size=args.bucket_size,
                                       **parallel)
    return cfg


def timed_steps(run, warmup: int, steps: int) -> list[float]:
    """Seconds of each of `steps` training steps after `warmup` untimed ones; the ranks
    start each step together."""
    times = []
    for it, micro in enumerate(run.batches(0, warmup + steps)):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        run.step(it, micro)
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def run(pstate, args, parallel: dict, memory: bool) -> dict:
    """`memory`: a separate pass of 2 steps (the second holds Adam's state) with RSS
    following live tensors; the timing pass keeps glibc's normal (faster) allocator."""
    from megavit.tasks.classification import classification_run

    if memory:
        rss_follows_tensors()
        reset_peak_rss()
    before = rss_mb()
    run = classification_run(build_config(args, parallel), pstate)
    times = timed_steps(run, 0, 2) if memory else timed_steps(run, args.warmup, args.steps)
    per_param = run.optimizer.bytes_per_parameter()
    n = sum(p.numel() for p in run.model.parameters())
    return {"times": times, "peak_growth_mb": peak_rss_mb() - before,
            "state_mb": sum(per_param.values()) * n / 2**20, "per_param": per_param,
            "buckets": len(run.buffers.buckets), "params": n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps each (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps each (default 2)")
    p.add_argument("--bucket-size", type=int, default=1_000_000,
                   help="gradient bucket size in elements (default 1,000,000)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from tests.harness import run_distributed

    results = {}
    for name, parallel in CONFIGS.items():
        print(f"running: {name} ...", file=sys.stderr, flush=True)
        results[name] = run_distributed(2, 1, {"r": (run, (args, parallel, False))},
                                        timeout=1800)["r"]
        memory = run_distributed(2, 1, {"r": (run, (args, parallel, True))}, timeout=1800)["r"]
        for timing, measured in zip(results[name], memory):
            timing["peak_growth_mb"] = measured["peak_growth_mb"]
    base = statistics.median(results["reduce after backward"][0]["times"])
    base_mem = max(r["peak_growth_mb"] for r in results["reduce after backward"])
    first = results["reduce after backward"][0]
    print(f"# dp_overlap: DP=2, 2 gloo processes x 1 thread, fp32; vit-s widths, {args.layers} "
          f"parallel blocks, {first['params']:,} parameters, 196 tokens; global batch 16 = "
          f"2 ranks x 2 micro-batches x 4; buckets of {args.bucket_size:,} elements "
          f"({first['buckets']} buckets)")
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}; command: python -m benchmarks.dp_overlap "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    print("| configuration          | median step ms | vs after-backward | peak RSS growth MB "
          "(rank 0 / 1) | vs after-backward | params+grads+optimizer MB | bytes/param |")
    print("|------------------------|----------------|-------------------|-------------------"
          "-------------|-------------------|---------------------------|-------------|")
    for name, per_rank in results.items():
        med = statistics.median(per_rank[0]["times"])
        mem = [r["peak_growth_mb"] for r in per_rank]
        bpp = sum(per_rank[0]["per_param"].values())
        print(f"| {name:<22} | {med * 1e3:14.1f} | {med / base:17.3f} | "
              f"{mem[0]:13.1f} / {mem[1]:13.1f} | {max(mem) / base_mem:17.3f} | "
              f"{per_rank[0]['state_mb']:25.2f} | {bpp:11.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
