#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): megavit vs timm bf16 steps of ViT-B/16 and
# ViT-L/16 on one CUDA device, MFU, peak memory against the planner, NVML, save / load.
# Prints one table; on a machine without CUDA it says so and exits 0.
#   bash benchmarks/gpu_check.sh [--presets vit-b vit-l] [--steps 30]
#   PYTHON=.venv-timm/bin/python bash benchmarks/gpu_check.sh   # an env with CUDA torch + timm
# Exit 1 when a GPU driver is here but this torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m benchmarks.gpu_check "$@"
