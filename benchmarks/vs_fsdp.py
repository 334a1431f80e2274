"""megavit's layouts against PyTorch FSDP2 on the same model and global batch.

    .venv/bin/python -m benchmarks.vs_fsdp                 # ViT-S width, 4 blocks, batch 16
    .venv/bin/python -m benchmarks.vs_fsdp --layers 2 --steps 3

The claim tested: megavit reaches >= 1.15x FSDP's throughput at <= 0.7x its peak memory.

One model — ViT-S widths (384 / 6 heads / 1536), parallel (ViT-22B) blocks without
QK-LayerNorm, GAP head, 224x224 images (196 tokens), fp32 — and one global batch of 16
images per step, on 2 gloo processes with one thread each:

    megavit TP=2 + SP + selective   both ranks see all 16 images, each holds half of every
                                    block (sequence parallel, attention core recomputed)
    megavit TP=2 + SP + full        the same with every block recomputed (like-for-like with
                                    FSDP + checkpointing; not part of the claim)
    megavit DP=2 + dist-opt         8 images per rank, Adam state sharded (ZeRO-1), the
                                    gradient reduction overlapped with backward
    FSDP2                           `fully_shard` on each block and the root (ZeRO-3), 8
                                    images per rank
    FSDP2 + checkpointing           the same with every block's activations recomputed

The FSDP model is plain PyTorch (benchmarks/tp_vs_dtensor.py's RefViT, the same
architecture and parameter count). Every step is forward + backward + AdamW (foreach
kernel everywhere). Each configuration runs in its own process groups: one pass for step
time, then a pass of 2 steps for memory. Peak memory: each rank's peak resident set (VmHWM, reset just before) minus its RSS before the model was
built, with glibc told to map every allocation over 64 KiB on its own and return it when
freed, so resident memory follows live tensors; one-time costs of first use are paid
before, by a step of a tiny model through both frameworks. Step time: median of the timed
steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import time


import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.dp_overlap import (peak_rss_mb, reset_peak_rss, rss_follows_tensors,
                                   rss_mb, timed_steps)
from megavit.config import Config, DataConfig, TrainingConfig, preset_model_config

GLOBAL_BATCH = 16
MEGAVIT = {
    "megavit TP2+SP+selective": (2, {"sequence_parallel": True,
                                     "recompute_granularity": "selective"}),
    "megavit TP2+SP+full": (2, {"sequence_parallel": True, "recompute_granularity": "full",
                                "recompute_method": "uniform", "recompute_num_layers": 1}),
    "megavit DP2+dist-opt": (1, {"use_distributed_optimizer": True,
                                 "overlap_grad_reduce": True}),
}
FSDP = {"FSDP2": False, "FSDP2 + checkpointing": True}


def model_config(layers: int, tiny: bool = False):
    """The benchmark's model; `tiny`: a vit-debug-sized one of the same kind (warm-up)."""
    if tiny:
        return preset_model_config("vit-debug", num_layers=2, num_classes=100,
                                   qk_layernorm=False, pooling="gap")
    return preset_model_config("vit-s", num_layers=layers, num_classes=100,
                               qk_layernorm=False, pooling="gap", img_h=224, img_w=224)


def megavit_steps(pstate, model_cfg, parallel: dict, warmup: int, steps: int) -> dict:
    from megavit.tasks.classification import classification_run

    micro = GLOBAL_BATCH // pstate.dp.size
    cfg = Config(model=model_cfg,
                 training=TrainingConfig(micro_batch_size=micro, global_batch_size=GLOBAL_BATCH,
                                         train_iters=warmup + steps, lr=1e-4,
                                         clip_grad=0.0, adam_impl="foreach"),
                 data=DataConfig(dataset="synthetic", synthetic_size=GLOBAL_BATCH))
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=pstate.tp.size,
                                       **parallel)
    run = classification_run(cfg, pstate)
    times = timed_steps(run, warmup, steps)
    params = sum(p.numel() * (pstate.tp.size if getattr(p, "tp_shard", None) else 1)
                 for p in run.model.parameters())
    return {"times": times, "params": params}


class Checkpointed(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


def fsdp_steps(pstate, model_cfg, checkpointing: bool, warmup: int, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from benchmarks.tp_vs_dtensor import RefViT

    torch.manual_seed(0)
    model = RefViT(model_cfg)
    params = sum(p.numel() for p in model.parameters())
    mesh = init_device_mesh("cpu", (pstate.world.size,))
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh)
        if checkpointing:
            model.blocks[i] = Checkpointed(block)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    local = GLOBAL_BATCH // pstate.world.size
    g = torch.Generator().manual_seed(pstate.rank)
    images = torch.randn(local, model_cfg.num_channels, model_cfg.img_h, model_cfg.img_w,
                         generator=g)
    labels = torch.randint(0, model_cfg.num_classes, (local,), generator=g)
    times = []
    for it in range(warmup + steps):
        torch.distributed.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        opt.step()
        if it >= warmup:
            times.append(time.perf_counter() - t0)
    return {"times": times, "params": params}


def measured(pstate, args, kind: str, option, memory: bool) -> dict:
    """One configuration's steps and peak memory. Both frameworks first run one step of a
    tiny model in this same process, so one-time costs (libraries initialised on first use:
    about 40 MB for megavit's first model build here) are in the baseline for everyone and
    the growth is what this model and batch need."""
    if memory:
        rss_follows_tensors()
    tiny = model_config(0, tiny=True)
    megavit_steps(pstate, tiny, MEGAVIT[next(iter(MEGAVIT))][1] if pstate.tp.size > 1 else {},
                  0, 1)
    if pstate.tp.size == 1:
        fsdp_steps(pstate, tiny, True, 0, 1)
    reset_peak_rss()
    before = rss_mb()
    cfg = model_config(args.layers)
    warmup, steps = (0, 2) if memory else (args.warmup, args.steps)
    if kind == "megavit":
        out = megavit_steps(pstate, cfg, option, warmup, steps)
    else:
        out = fsdp_steps(pstate, cfg, option, warmup, steps)
    return {**out, "peak_growth_mb": peak_rss_mb() - before}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps each (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps each (default 2)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    from tests.harness import run_distributed

    runs = {**{n: (tp, "megavit", o) for n, (tp, o) in MEGAVIT.items()},
            **{n: (1, "fsdp", o) for n, o in FSDP.items()}}
    results = {}
    for name, (tp, kind, option) in runs.items():
        print(f"running: {name} ...", file=sys.stderr, flush=True)
        results[name] = run_distributed(2, tp, {"r": (measured, (args, kind, option, False))},
                                        timeout=1800)["r"]
        memory = run_distributed(2, tp, {"r": (measured, (args, kind, option, True))},
                                 timeout=1800)["r"]
        for timing, pass2 in zip(results[name], memory):
            timing["peak_growth_mb"] = pass2["peak_growth_mb"]
    med = {n: statistics.median(r[0]["times"]) for n, r in results.items()}
    mem = {n: max(x["peak_growth_mb"] for x in r) for n, r in results.items()}
    print(f"# vs_fsdp: 2 gloo processes x 1 thread, fp32; ViT-S widths, {args.layers} parallel "
          f"blocks, 196 tokens, GAP; global batch {GLOBAL_BATCH}; step = fwd + bwd + AdamW "
          f"(foreach); parameters: " + ", ".join(f"{n.split()[0]} {r[0]['params']:,}"
                                                 for n, r in list(results.items())[2:4]))
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"torch {torch.__version__}; command: python -m benchmarks.vs_fsdp "
          f"{' '.join(argv if argv is not None else sys.argv[1:])}")
    print("| run                      | median step ms | images/s | peak RSS growth MB "
          "(max rank) |")
    print("|--------------------------|----------------|----------|--------------------"
          "----------|")
    for name in results:
        print(f"| {name:<24} | {med[name] * 1e3:14.1f} | {GLOBAL_BATCH / med[name]:8.1f} | "
              f"{mem[name]:28.1f} |")
    print()
    for ours in MEGAVIT:
        for theirs in FSDP:
            speed, memory = med[theirs] / med[ours], mem[ours] / mem[theirs]
            verdict = "met" if speed >= 1.15 and memory <= 0.7 else "NOT met"
            print(f"{ours} vs {theirs}: throughput {speed:.2f}x, peak memory {memory:.2f}x "
                  f"(claim >= 1.15x at <= 0.70x): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
