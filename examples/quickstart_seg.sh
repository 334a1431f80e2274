#!/usr/bin/env bash
# Semantic segmentation on the CPU: a small ViT-22B-style model (4 blocks of width 128,
# 8x8 patches of a 64x64 canvas) with ViTDet's simple feature pyramid and a per-pixel
# decoder, trained on --dataset mnist-seg (1-3 MNIST-5k digits at random places and sizes,
# every stroke pixel labelled with its digit, background 0: 11 classes; a fresh canvas per
# draw), then evaluated on the 1,000 fixed held-out canvases: mean IoU over the 11 classes
# and pixel accuracy.
#
#   make quickstart-seg                       # from a fresh clone
#   bash examples/quickstart_seg.sh           # inside an environment with megavit installed
#   ITERS=300 bash examples/quickstart_seg.sh --tensor-model-parallel-size 1   # extra flags
#
# Ends with the summary line:
#   [megavit] done | iteration N | train_seconds S | loss L | eval_loss E | eval_miou M | eval_pixel_accuracy A | ...
set -euo pipefail
OUT=${OUT:-runs/quickstart_seg}
ITERS=${ITERS:-850}
mkdir -p "$OUT"
rm -f "$OUT/metrics.jsonl"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} python -m megavit.segment \
  --dataset mnist-seg --img-h 64 --img-w 64 --num-channels 1 --patch-dim 8 \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 512 \
  --neck simple-pyramid --neck-channels 64 --decoder-channels 64 \
  --micro-batch-size 32 --global-batch-size 32 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 0 --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.05 \
  --clip-grad 1.0 --seed 1234 --log-interval 50 --eval-interval "$ITERS" \
  --progress-bar off --metrics-file "$OUT/metrics.jsonl" "$@"
