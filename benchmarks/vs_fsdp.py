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
    megavit DP=2 full (FSDP2)       megavit's own engine with --data-parallel-sharding-strategy
                                    full: torch's `fully_shard` on each block and on the model
                                    chunk (ZeRO-3), 8 images per rank, megavit's optimizer
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
steps. The host's load average before and after is printed: other work on
the 2 cores (tests, builds) slows every row and the spec's figures.

Beside each measurement, the planner's prediction of the same run (megavit/planner:
`evaluate`, i.e. `predict_step` and `memory_of`, precision fp32, 2 "GPUs" a node): step
time and memory per rank, and measured / predicted. The plain FSDP2 rows are predicted as
megavit's full sharding of the same model at DP=2 (PlanLayout(full_sharding=True)) and
marked so. The "GPU" is this host as 2 gloo processes of one thread each, a spec in the
planner's JSON format measured at the start of the run (`measure_cpu_spec`: matmul FLOP/s,
copy bandwidth, gloo all-reduce / all-gather latency and bandwidth, on both processes at
once); benchmarks/cpu_gloo_2proc.json records one such measurement:

    .venv/bin/python -m benchmarks.vs_fsdp --spec-only --write-spec benchmarks/cpu_gloo_2proc.json
    .venv/bin/python -m benchmarks.vs_fsdp --spec benchmarks/cpu_gloo_2proc.json   # reuse it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


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
    "megavit DP2 full (FSDP2)": (1, {"data_parallel_sharding_strategy": "full"}),
}
FSDP = {"FSDP2": False, "FSDP2 + checkpointing": True}
GPUS_PER_NODE = 2                      # both processes on this host: the "intra-node" link
PROXY = " *"                           # marks a row predicted as another layout
# Collective sizes timed for the spec: the whole tensor in bytes (all-reduce's input,
# all-gather's output), as the planner's ring model counts them.
COLLECTIVE_BYTES = (8, 4096, 2**18, 2**22, 2**25)


def model_config(layers: int, tiny: bool = False):
    """The benchmark's model; `tiny`: a vit-debug-sized one of the same kind (warm-up)."""
    if tiny:
        return preset_model_config("vit-debug", num_layers=2, num_classes=100,
                                   qk_layernorm=False, pooling="gap")
    return preset_model_config("vit-s", num_layers=layers, num_classes=100,
                               qk_layernorm=False, pooling="gap", img_h=224, img_w=224)


def megavit_config(model_cfg, tp: int, dp: int, parallel: dict, iters: int) -> Config:
    """The training Config of a megavit row (the run's, and the planner's input)."""
    cfg = Config(model=model_cfg,
                 training=TrainingConfig(micro_batch_size=GLOBAL_BATCH // dp,
                                         global_batch_size=GLOBAL_BATCH, train_iters=iters,
                                         lr=1e-4, clip_grad=0.0, adam_impl="foreach"),
                 data=DataConfig(dataset="synthetic", synthetic_size=GLOBAL_BATCH))
    cfg.parallel = dataclasses.replace(cfg.parallel, tensor_model_parallel_size=tp,
                                       **parallel)
    return cfg


def megavit_steps(pstate, model_cfg, parallel: dict, warmup: int, steps: int) -> dict:
    from megavit.tasks.classification import classification_run

    cfg = megavit_config(model_cfg, pstate.tp.size, pstate.dp.size, parallel, warmup + steps)
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


# --- the planner's "GPU": this host as 2 gloo processes, measured --------------------------

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The host's 1-minute load average (what else was running while we measured)."""
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[0]
    except OSError:
        return "unknown"


def _best_seconds(fn, reps: int, calls: int = 1) -> float:
    """The fastest of `reps` timings of `calls` back-to-back calls of `fn`, per call (one
    untimed call first)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _copy_bytes_per_s(elements: int) -> float:
    """Bytes read + written per second by the best of 10 copies of an fp32 tensor."""
    src = torch.ones(elements)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / _best_seconds(lambda: dst.copy_(src), 10)


def hardware_on_rank(pstate) -> dict:
    """This process's figures, measured while the other process measures the same, with
    one thread each (as the benchmark runs): FLOP/s of square matmuls (best of a few),
    bytes/s of a 256 MiB tensor copy (read + write), and seconds per gloo all-reduce /
    all-gather of each of COLLECTIVE_BYTES."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    flops = {}
    for name, dtype, n, reps in (("fp32", torch.float32, 1024, 10),
                                 ("bf16", torch.bfloat16, 512, 3),
                                 ("fp16", torch.float16, 512, 3)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        dist.barrier()
        flops[name] = 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), reps)
    dist.barrier()
    copy = _copy_bytes_per_s(2 ** 26)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    world = dist.get_world_size()
    seconds = {}
    for op in ("all_reduce", "all_gather"):
        for nbytes in COLLECTIVE_BYTES:
            whole = torch.ones(nbytes // 4)
            part = torch.ones(nbytes // 4 // world)
            call = ((lambda: dist.all_reduce(whole)) if op == "all_reduce"
                    else (lambda: gather(whole, part)))
            calls = 50 if nbytes <= 2 ** 18 else (10 if nbytes <= 2 ** 22 else 3)
            dist.barrier()
            seconds[(op, nbytes)] = _best_seconds(call, 3, calls)
    return {"flops": flops, "copy_bytes_per_s": copy, "collective_s": seconds}


def fit_link(points: dict, ranks: int) -> tuple[float, float]:
    """(alpha seconds, beta seconds per byte) of the planner's ring model
    (step_time._ring: steps x alpha + steps / ranks x bytes x beta) fitted to measured
    {(op, bytes): seconds} by least squares in relative error; where that gives a
    non-positive figure, alpha from the smallest message and beta from the largest."""
    from megavit.planner.step_time import _ring

    rows = [[_ring(op, n, ranks, 1.0, 0.0) / t, _ring(op, n, ranks, 0.0, 1.0) / t]
            for (op, n), t in points.items()]
    a = torch.tensor(rows, dtype=torch.float64)
    alpha, beta = torch.linalg.lstsq(a, torch.ones(len(rows), 1, dtype=torch.float64)
                                     ).solution.flatten().tolist()
    if alpha <= 0 or beta <= 0:
        (op, small), (_, large) = min(points), max(points, key=lambda k: k[1])
        alpha = points[(op, small)] / _ring(op, small, ranks, 1.0, 0.0)
        beta = ((points[(op, large)] - _ring(op, large, ranks, alpha, 0.0))
                / _ring(op, large, ranks, 0.0, 1.0))
    return alpha, beta


def measure_cpu_spec(command: str) -> dict:
    """This host as the planner's GPU spec (megavit/planner/hardware.py's JSON fields):
    each figure measured now on 2 gloo processes of one thread each."""
    from tests.harness import run_distributed

    load = load_average()
    ranks = run_distributed(2, 1, {"hw": (hardware_on_rank, ())}, timeout=600)["hw"]
    flops = {k: statistics.mean(r["flops"][k] for r in ranks) for k in ranks[0]["flops"]}
    copy = statistics.mean(r["copy_bytes_per_s"] for r in ranks)
    # a collective ends when its slower rank does
    points = {k: max(r["collective_s"][k] for r in ranks) for k in ranks[0]["collective_s"]}
    alpha, beta = fit_link(points, len(ranks))
    per_op = {op: fit_link({k: v for k, v in points.items() if k[0] == op}, len(ranks))
              for op in ("all_reduce", "all_gather")}
    with open("/proc/meminfo") as f:
        mem_total = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    link_bw, latency = round(1 / beta / 1e9, 3), round(alpha * 1e6, 2)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    fits = "; ".join(f"{op} alone: {a * 1e6:.1f} us, {1 / b / 1e9:.2f} GB/s"
                     for op, (a, b) in per_op.items())
    return {
        "name": "cpu-gloo-2proc",
        "description": f"{cpu_name()}, {os.cpu_count()} cores, as 2 gloo processes of one "
                       "thread each on one host (benchmarks/vs_fsdp.py's setting): a 'GPU' "
                       "is one process on one core, the 'node' is the host (inter-node set "
                       "equal to intra-node)",
        "peak_tflops": {"fp32": round(flops["fp32"] / 1e12, 5),
                        "tf32": round(flops["fp32"] / 1e12, 5),
                        "bf16": round(flops["bf16"] / 1e12, 5),
                        "fp16": round(flops["fp16"] / 1e12, 5)},
        "memory_bytes": mem_total * 1024 // 2,
        "memory_bandwidth_gbps": round(copy / 1e9, 3),
        "intra_node_bandwidth_gbps": link_bw,
        "inter_node_bandwidth_gbps": link_bw,
        "intra_node_latency_us": latency,
        "inter_node_latency_us": latency,
        "sources": (
            f"measured {when} with `{command}` (torch {torch.__version__}; load average "
            f"{load} just before: other work on the host lowers every figure), both processes "
            "at once, one thread each; per-process figures are the mean of the two ranks. "
            "fp32: best of 10 torch.mm of 1024x1024 by 1024x1024 (2n^3 FLOPs); tf32: the "
            "fp32 figure (no TF32 on CPU: the same kernel); bf16 / fp16: best of 3 torch.mm "
            "at 512 (not used by the fp32 benchmark). memory_bandwidth: best of 10 copies of "
            "a 256 MiB fp32 tensor, counted as read + write (512 MiB moved). memory_bytes: "
            "/proc/meminfo MemTotal / 2 processes. Links: gloo all_reduce and all_gather "
            "(all_gather_single) of 8 B to 32 MiB (the whole tensor), best of 3 loops per "
            "size, the slower rank's; latency and bandwidth are the alpha and 1/beta of the "
            "planner's ring model (step_time._ring) fitted to both ops by least squares in "
            f"relative error ({fits}); inter-node = intra-node (one host). efficiency: not "
            "given, so the planner's defaults (Efficiency(): gemm_max 0.8, gemm_half 96, "
            "elementwise 16), not fitted to this CPU"),
        "measurements": {
            "matmul_gflops": {k: round(v / 1e9, 2) for k, v in flops.items()},
            "copy_gbps": round(copy / 1e9, 3),
            "collective_us": {f"{op} {n} B": round(t * 1e6, 1)
                              for (op, n), t in sorted(points.items())},
        },
    }


def load_spec(raw: dict, path: str | None):
    """The planner's GpuSpec of `raw` (checked by the planner's own loader), written to
    `path` when given."""
    from megavit.planner.hardware import load_gpu

    text = json.dumps(raw, indent=2) + "\n"
    if path:
        Path(path).write_text(text)
        return load_gpu(str(path))
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "spec.json"
        file.write_text(text)
        return load_gpu(str(file))


# --- the planner's prediction of each row -----------------------------------------------

def predicted(spec, layers: int, tp: int, kind: str, option):
    """The planner's Candidate (step time, memory by component) for a row run on `spec`:
    megavit's rows from the Config the run builds; FSDP2's as megavit's full sharding of
    the same model at DP=2."""
    from megavit.planner.search import PlannedModel, evaluate
    from megavit.planner.step_time import PlanLayout

    dp = 2 // tp
    if kind == "megavit":
        cfg = megavit_config(model_config(layers), tp, dp, option, 1)
        par = cfg.parallel
        full = par.data_parallel_sharding_strategy == "full"
        layout = PlanLayout(tp=tp, dp=dp, sequence_parallel=par.sequence_parallel and tp > 1,
                            recompute=par.recompute_granularity or "none",
                            micro_batch=cfg.training.micro_batch_size,
                            global_batch=GLOBAL_BATCH,
                            distributed_optimizer=par.use_distributed_optimizer and not full,
                            full_sharding=full and dp > 1,
                            overlap_grad_reduce=par.overlap_grad_reduce,
                            bytes_per_element=4)
    else:
        cfg = megavit_config(model_config(layers), 1, dp,
                             {"data_parallel_sharding_strategy": "full"}, 1)
        layout = PlanLayout(dp=dp, recompute="full" if option else "none",
                            micro_batch=GLOBAL_BATCH // dp, global_batch=GLOBAL_BATCH,
                            full_sharding=True, bytes_per_element=4)
    return evaluate(PlannedModel.vit(cfg), layout, spec, GPUS_PER_NODE, precision="fp32")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4, help="blocks (default 4)")
    p.add_argument("--steps", type=int, default=5, help="timed steps each (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps each (default 2)")
    p.add_argument("--spec", help="predict with this recorded spec (e.g. "
                   "benchmarks/cpu_gloo_2proc.json) instead of measuring one now")
    p.add_argument("--write-spec", metavar="PATH",
                   help="write the spec measured now to PATH (the planner's JSON format)")
    p.add_argument("--spec-only", action="store_true",
                   help="measure (and with --write-spec write) the spec, print it, stop")
    args = p.parse_args(argv)
    if args.spec and (args.write_spec or args.spec_only):
        p.error("--spec reads a recorded spec; --write-spec / --spec-only measure one")
    os.environ["OMP_NUM_THREADS"] = "1"
    from megavit.planner.hardware import load_gpu
    from tests.harness import run_distributed

    command = ("python -m benchmarks.vs_fsdp "
               f"{' '.join(argv if argv is not None else sys.argv[1:])}").strip()
    load_start = load_average()
    if args.spec:
        spec, spec_from = load_gpu(args.spec), f"recorded in {args.spec}"
    else:
        print("measuring: this host's spec ...", file=sys.stderr, flush=True)
        raw = measure_cpu_spec(command)
        spec = load_spec(raw, args.write_spec)
        spec_from = "measured at the start of this run" + (
            f", written to {args.write_spec}" if args.write_spec else "")
    spec_line = (f"# planner spec {spec.name} ({spec_from}): fp32 matmul "
                 f"{spec.peak_flops('fp32') / 1e9:.1f} GFLOP/s, copy "
                 f"{spec.memory_bandwidth_gbps:.2f} GB/s, gloo {spec.intra_node_bandwidth_gbps:.2f}"
                 f" GB/s + {spec.intra_node_latency_us:.1f} us a message, per process; "
                 f"step-time constants: {spec.efficiency_note}; precision fp32, "
                 f"{GPUS_PER_NODE} processes a node")
    if args.spec_only:
        print(spec_line)
        print(json.dumps(raw, indent=2))
        return 0

    runs = {**{n: (tp, "megavit", o) for n, (tp, o) in MEGAVIT.items()},
            **{n: (1, "fsdp", o) for n, o in FSDP.items()}}
    results, plans = {}, {}
    for name, (tp, kind, option) in runs.items():
        plans[name] = predicted(spec, args.layers, tp, kind, option)
        print(f"running: {name} ...", file=sys.stderr, flush=True)
        results[name] = run_distributed(2, tp, {"r": (measured, (args, kind, option, False))},
                                        timeout=1800)["r"]
        memory = run_distributed(2, tp, {"r": (measured, (args, kind, option, True))},
                                 timeout=1800)["r"]
        for timing, pass2 in zip(results[name], memory):
            timing["peak_growth_mb"] = pass2["peak_growth_mb"]
    med = {n: statistics.median(r[0]["times"]) for n, r in results.items()}
    mem = {n: max(x["peak_growth_mb"] for x in r) for n, r in results.items()}
    plan_ms = {n: c.step.step_s * 1e3 for n, c in plans.items()}
    plan_mb = {n: c.memory["total"] / 2**20 for n, c in plans.items()}
    ours_dp = next(n for n, (tp, _) in MEGAVIT.items() if tp == 1)
    shown = (ours_dp, next(iter(FSDP)))
    print(f"# vs_fsdp: 2 gloo processes x 1 thread, fp32; ViT-S widths, {args.layers} parallel "
          f"blocks, 196 tokens, GAP; global batch {GLOBAL_BATCH}; step = fwd + bwd + AdamW "
          f"(foreach); parameters: " + ", ".join(f"{n.split()[0]} {results[n][0]['params']:,}"
                                                 for n in shown))
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores (load average {load_start} at "
          f"the start, {load_average()} at the end); torch {torch.__version__}; "
          f"command: {command}")
    print(spec_line)
    width = max(len(n) for n in runs) + len(PROXY)
    print(f"| {'run':<{width}} | median step ms | predicted step ms | measured/predicted | "
          "images/s | peak RSS growth MB (max rank) | predicted memory MB |")
    print(f"|{'-' * (width + 2)}|----------------|-------------------|--------------------|"
          "----------|------------------------------|---------------------|")
    for name in results:
        label = name + (PROXY if name in FSDP else "")
        print(f"| {label:<{width}} | {med[name] * 1e3:14.1f} | {plan_ms[name]:17.1f} | "
              f"{med[name] * 1e3 / plan_ms[name]:18.2f} | {GLOBAL_BATCH / med[name]:8.1f} | "
              f"{mem[name]:28.1f} | {plan_mb[name]:19.1f} |")
    print(f"{PROXY.strip()} predicted as megavit's full sharding of the same model at DP=2 "
          "(PlanLayout(full_sharding=True)); FSDP2 here is plain PyTorch (RefViT)")
    print()
    print("planner's parts: step ms (step = pipeline + dp_exposed + param_gather + optimizer; "
          "tp_comm, fsdp_exposed and bubble are inside pipeline), memory MB by component:")
    for name, c in plans.items():
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in c.step.parts.items() if v)
        memory = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in c.memory.items() if k != "total")
        print(f"  {name}: step: {parts or '-'}; memory: {memory}; measured/predicted memory "
              f"{mem[name] / plan_mb[name]:.2f}")
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
