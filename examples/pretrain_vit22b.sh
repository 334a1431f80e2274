#!/usr/bin/env bash
# ViT-22B pretraining launch.
#
#   NNODES=32 NODE_RANK=$i MASTER_ADDR=node0 bash examples/pretrain_vit22b.sh   # on each node
#   (32 nodes x 8 GPUs = TP 8 x PP 4 x DP 8)
#   SMOKE=1 bash examples/pretrain_vit22b.sh                                    # CPU smoke run
#
# Meant for: nodes of 8 x 80 GB GPUs (H100/A100) with NVLink inside a node and InfiniBand
# between nodes, inside the NGC PyTorch container (see Dockerfile); data as an image folder
# (DATA_PATH/train/CLASS/*, DATA_PATH/val/CLASS/*).
#
# Layout: tensor parallel 8 inside each node with sequence parallelism, 4 pipeline stages
# (12 blocks each, as 2 virtual stages of 6: the interleaved schedule), data parallel over
# the rest (so nodes come in groups of 4). bf16 parameters and activations with fp32
# gradient accumulation and reduction, and the distributed optimizer (fp32 masters and Adam
# moments sharded over DP=8, gradient buckets reduce-scattered while backward runs): each
# GPU holds 22.2e9 / 32 = 694M parameters at 2 + 4 + 12/8 = 7.5 bytes each, 5.2 GB
# (unsharded it would be 18 bytes, 12.5 GB; the start-up log prints the measured bytes per
# parameter; `python tools/model_summary.py --preset vit-22b --tensor-model-parallel-size 8
# --pipeline-model-parallel-size 4` prints the parameters per stage). Activations:
# --recompute-granularity auto picks, per stage, the fewest recomputed blocks that keep them
# under --activation-memory-budget-gb (the first stage holds the most micro-batches at
# once); the plan is printed at start-up.
#
# Checkpoints go to RUN_DIR/ckpt every 1000 iterations (the last 3 kept) and the run resumes
# from there: when a rank dies, torchrun restarts the workers (up to MAX_RESTARTS times) and
# they continue from the latest complete checkpoint; relaunching the script does the same.
# `python tools/checkpoint_inspect.py RUN_DIR/ckpt` shows what is saved.
#
# SMOKE=1 shrinks the same launch to a CPU run that finishes in seconds: vit-debug on the
# embedded digits, 4 processes as TP=2 x PP=2 with sequence parallelism, selective
# recomputation and the distributed optimizer's code path (DP=1: nothing to shard), fp32
# (bf16 is ~20x slower on CPUs), through the same torchrun command.
set -euo pipefail

SMOKE=${SMOKE:-0}
if [[ "$SMOKE" == "1" ]]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-4}
  TP=2
  PP=2
  MODEL=(--preset vit-debug --num-channels 1 --img-h 16 --img-w 16)
  DATA=(--dataset digits)
  BATCH=(--micro-batch-size 4 --global-batch-size 16 --train-iters 20)
  EXTRA=(--device cpu --distributed-backend gloo --log-interval 5 --lr 1e-3
         --sequence-parallel --recompute-granularity selective
         --use-distributed-optimizer --overlap-grad-reduce --ddp-bucket-size 20000)
  export OMP_NUM_THREADS=1
  RESTARTS=${MAX_RESTARTS:-0}
else
  RESTARTS=${MAX_RESTARTS:-3}
  NPROC_PER_NODE=${NPROC_PER_NODE:-8}
  TP=8
  PP=4
  MODEL=(--preset vit-22b)
  DATA=(--dataset image-folder --data-path "${DATA_PATH:?set DATA_PATH to an image folder}"
        --num-workers 8 --augment none)
  # ViT-22B trained with a global batch of 65,536 images; start lower while tuning.
  BATCH=(--micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH:-4096}" --train-iters 300000)
  EXTRA=(--bf16 --use-distributed-optimizer
         --overlap-grad-reduce
         --sequence-parallel --num-layers-per-virtual-pipeline-stage 6
         --recompute-granularity auto --activation-memory-budget-gb "${ACTIVATION_GB:-20}"
         --lr 1e-3 --min-lr 1e-5 --lr-warmup-iters 10000 --lr-decay-style cosine
         --weight-decay 0.05 --clip-grad 1.0 --log-interval 10 --eval-interval 5000
         --eval-iters 20 --metrics-file "${RUN_DIR:-runs/vit22b}/metrics.jsonl"
         --tensorboard-dir "${RUN_DIR:-runs/vit22b}/tb"
         --save "${RUN_DIR:-runs/vit22b}/ckpt" --load "${RUN_DIR:-runs/vit22b}/ckpt"
         --save-interval 1000 --keep-last-checkpoints 3)
fi

exec torchrun \
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  --max-restarts "$RESTARTS" \
  -m megavit.pretrain \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  "${MODEL[@]}" "${DATA[@]}" "${BATCH[@]}" "${EXTRA[@]}" "$@"
