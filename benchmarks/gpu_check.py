"""The GPU check: megavit's bf16 training step on one CUDA device against timm, its MFU
against the datasheet, its measured peak memory against the planner, NVML lines, a
checkpoint save and load. On a machine without CUDA it says so and exits 0.

    bash benchmarks/gpu_check.sh                     # or: python -m benchmarks.gpu_check
    python -m benchmarks.gpu_check --presets vit-b --steps 20

Per model (ViT-B/16 and ViT-L/16 at 224 px by default, 1000 classes, synthetic images):

    megavit     `python -m megavit.pretrain --bf16 --tf32` for --steps iterations with a
                checkpoint at the end, then the same run resumed for one more iteration
                (the save / load check); step time and images/s from its metrics file (the
                last logging interval), NVML memory / utilisation / power fields present
    timm        the same dimensions as timm's ViT (parallel-block ViT-22B style blocks as in
                benchmarks/step_vs_timm.py), bf16 autocast, SDPA, fused AdamW, in this
                process; median step over --steps (skipped with a line when timm is not
                importable)
    MFU         megavit's matmul FLOPs (`vit_flops`) / step time / the device's datasheet
                bf16 peak (megavit/planner/gpus/: matched by the device's name)
    memory      megavit's measured peak (torch.cuda.max_memory_allocated, the metrics'
                gpu_mem_gib) against megavit/planner/memory.py's prediction for the layout

One table at the end, with the device, the command and each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = {"vit-b": 64, "vit-l": 32, "vit-s": 128, "vit-debug": 8}


def gpu_spec_for(name: str):
    """The packaged GPU spec whose name the device's name matches, or None."""
    from megavit.planner.hardware import load_gpu

    lowered = name.lower()
    for key, spec in (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80gb")):
        if key in lowered:
            return load_gpu(spec)
    return None


def megavit_run(preset: str, batch: int, steps: int, tmp: Path,
                precision: tuple[str, ...] = ("--bf16", "--tf32"), run=subprocess.run) -> dict:
    """Train, save, resume one iteration; what the metrics files and logs say (`run`: how
    a command runs, subprocess.run's signature)."""
    flags = ["--preset", preset, "--num-classes", "1000", "--dataset", "synthetic",
             *precision, "--micro-batch-size", str(batch), "--global-batch-size",
             str(batch), "--lr", "1e-4", "--log-interval", str(max(steps // 3, 1)),
             "--progress-bar", "off", "--eval-interval", "0", "--eval-iters", "1"]
    save = tmp / f"{preset}_ckpt"
    first = run([sys.executable, "-m", "megavit.pretrain", *flags, "--train-iters",
                 str(steps), "--save", str(save), "--save-interval", str(steps),
                 "--metrics-file", str(tmp / f"{preset}.jsonl")],
                cwd=ROOT, capture_output=True, text=True)
    if first.returncode:
        raise RuntimeError(f"megavit {preset}: exit {first.returncode}\n{first.stderr[-3000:]}")
    rows = [json.loads(line) for line in (tmp / f"{preset}.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"][-1]
    resumed = run([sys.executable, "-m", "megavit.pretrain", *flags, "--train-iters",
                   str(steps + 1), "--load", str(save)], cwd=ROOT, capture_output=True,
                  text=True)
    return {"step_s": train["step_time_ms"] / 1000, "images_per_second":
            train["images_per_second"], "peak_gib": train.get("gpu_mem_gib"),
            "nvml": all(k in train for k in ("gpu_mem_gib", "gpu_util_percent",
                                             "gpu_power_w")),
            "save_load": resumed.returncode == 0 and f"loaded checkpoint | iteration {steps}"
            in resumed.stdout}


def timm_step(cfg, batch: int, steps: int) -> float | None:
    """Median seconds of timm's bf16 training step of the same dimensions, or None without
    timm."""
    import torch
    import torch.nn.functional as F

    try:
        from benchmarks.step_vs_timm import build_timm
        model = build_timm(cfg).cuda()
    except ImportError:
        return None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    images = torch.randn(batch, cfg.num_channels, cfg.img_h, cfg.img_w, device="cuda")
    labels = torch.randint(0, cfg.num_classes, (batch,), device="cuda")
    times = []
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def predicted_gib(preset: str, batch: int) -> float:
    from megavit.config import parse_args
    from megavit.planner.memory import memory_per_stage

    cfg = parse_args(["--preset", preset, "--num-classes", "1000", "--bf16",
                      "--micro-batch-size", str(batch), "--global-batch-size", str(batch)])
    return memory_per_stage(cfg, dp=1)[0].total / 2**30


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=["vit-b", "vit-l"])
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        import shutil

        if shutil.which("nvidia-smi") or torch.version.cuda is not None:
            print(f"gpu_check: error: this machine has a GPU driver but torch "
                  f"{torch.__version__} sees no CUDA device (CUDA build: "
                  f"{torch.version.cuda}); run it with a CUDA build of torch, e.g. "
                  "PYTHON=.venv-timm/bin/python bash benchmarks/gpu_check.sh", file=sys.stderr)
            return 1
        print("gpu_check: no CUDA device on this machine: nothing to check (run it where "
              "torch.cuda.is_available() is True)")
        return 0
    torch.backends.cuda.matmul.allow_tf32 = True
    from megavit.config import parse_args
    from megavit.models.vit import vit_flops

    name = torch.cuda.get_device_name()
    spec = gpu_spec_for(name)
    print(f"device: {name} ({spec.name if spec else 'no packaged spec: no MFU'}); torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}")
    print(f"command: python -m benchmarks.gpu_check --presets {' '.join(args.presets)} "
          f"--steps {args.steps}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            batch = BATCH.get(preset, 32)
            cfg = parse_args(["--preset", preset, "--num-classes", "1000"]).model
            ours = megavit_run(preset, batch, args.steps, Path(tmp))
            theirs = timm_step(cfg, batch, args.steps)
            torch.cuda.empty_cache()         # timm's cached blocks, before the next run
            flops = vit_flops(cfg, batch)
            mfu = (flops / ours["step_s"] / spec.peak_flops("bf16")) if spec else None
            rows.append((preset, batch, ours, theirs, mfu, predicted_gib(preset, batch)))
    print("| model | batch | megavit step s | images/s | timm step s | megavit / timm | "
          "MFU (bf16 datasheet) | peak GiB measured | planner GiB | NVML fields | "
          "save + load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for preset, batch, ours, theirs, mfu, planned in rows:
        timm = f"{theirs:.4f}" if theirs else "timm not importable"
        ratio = f"{ours['step_s'] / theirs:.2f}" if theirs else "-"
        used = f"{mfu:.1%}" if mfu is not None else "-"
        peak = f"{ours['peak_gib']:.2f}" if ours["peak_gib"] is not None else "-"
        print(f"| {preset} | {batch} | {ours['step_s']:.4f} | "
              f"{ours['images_per_second']:,.0f} | {timm} | {ratio} | {used} | {peak} | "
              f"{planned:.2f} | {'present' if ours['nvml'] else 'MISSING'} | "
              f"{'ok' if ours['save_load'] else 'FAILED'} |")
    return 0 if all(r[2]["nvml"] and r[2]["save_load"] for r in rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "8")
    sys.exit(main())
