#!/usr/bin/env bash
# ViT-22B pretraining launch.
#
#   NNODES=32 NODE_RANK=$i MASTER_ADDR=node0 bash examples/pretrain_vit22b.sh   # on each node
#   SMOKE=1 bash examples/pretrain_vit22b.sh                                    # CPU smoke run
#
# Meant for: nodes of 8 x 80 GB GPUs (H100/A100) with NVLink inside a node and InfiniBand
# between nodes, inside the NGC PyTorch container (see Dockerfile); data as an image folder
# (DATA_PATH/train/CLASS/*, DATA_PATH/val/CLASS/*).
#
# Layout: tensor parallel 8 inside each node with sequence parallelism and selective
# recomputation, data parallel across nodes. Pipeline parallelism, the distributed
# optimizer and bf16 are open issues; their flags join this script as they land. Until
# then a 22B model at TP=8 needs about 22.2e9 * 16 bytes / 8 = 44 GB of fp32 weights,
# gradients and Adam state per GPU, plus an 11 GB flat copy of the gradients while they are
# averaged over DP (until bucketed reduction lands). Activations are small next to that:
# docs/activation_memory.md gives 5.25 s*b*h bytes per block in 16-bit at TP=8 (SP,
# selective): about 8 MB per block per image (here fp32: twice that), so 48 blocks keep
# under 1 GB for the micro-batch of 1 below, times the micro-batches in flight.
#
# SMOKE=1 shrinks the same launch to a CPU run that finishes in seconds: vit-debug on the
# embedded digits, 4 processes as TP=2 x DP=2 with the same SP and recompute flags, through
# the same torchrun command.
set -euo pipefail

SMOKE=${SMOKE:-0}
if [[ "$SMOKE" == "1" ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-4}
  TP=2
  MODEL=(--preset vit-debug --num-channels 1 --img-h 16 --img-w 16)
  DATA=(--dataset digits)
  BATCH=(--micro-batch-size 4 --global-batch-size 16 --train-iters 20)
  EXTRA=(--device cpu --distributed-backend gloo --log-interval 5 --lr 1e-3
         --sequence-parallel --recompute-granularity selective)
  export OMP_NUM_THREADS=1
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-8}
  TP=8
  MODEL=(--preset vit-22b)
  DATA=(--dataset image-folder --data-path "${DATA_PATH:?set DATA_PATH to an image folder}"
        --num-workers 8 --augment none)
  # ViT-22B trained with a global batch of 65,536 images; start lower while tuning.
  BATCH=(--micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH:-4096}" --train-iters 300000)
  EXTRA=(--sequence-parallel --recompute-granularity selective
         --lr 1e-3 --min-lr 1e-5 --lr-warmup-iters 10000 --lr-decay-style cosine
         --weight-decay 0.05 --clip-grad 1.0 --log-interval 10 --eval-interval 5000
         --eval-iters 20 --metrics-file "${RUN_DIR:-runs/vit22b}/metrics.jsonl"
         --tensorboard-dir "${RUN_DIR:-runs/vit22b}/tb")
fi

exec torchrun \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m megavit.pretrain \
  --tensor-model-parallel-size "$TP" \
  "${MODEL[@]}" "${DATA[@]}" "${BATCH[@]}" "${EXTRA[@]}" "$@"
