#!/usr/bin/env bash
# Fine-tuning on the CPU: pretrain a small ViT-22B-style model on MNIST-5k (4,000 real
# MNIST training digits, shrunk to 8x8), then fine-tune it on scikit-learn's 8x8 digits
# with a new classifier, against the same budget from scratch and a linear probe.
#
#   make quickstart-finetune                   # from a fresh clone
#   bash examples/finetune_digits.sh           # inside an environment with megavit installed
#
# Writes OUT/pretrain/ (checkpoint), OUT/{finetune,scratch,probe}.jsonl and OUT/curves.png
# (OUT defaults to runs/finetune); prints one summary line per run. The README's table was
# measured with this script on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/finetune}
PRETRAIN_ITERS=${PRETRAIN_ITERS:-1500}
ITERS=${ITERS:-300}
MODEL="--img-h 8 --img-w 8 --num-channels 1 --patch-dim 2 --num-layers 4 --hidden-size 64
       --num-attention-heads 4 --ffn-hidden-size 256 --pooling gap"
COMMON="--micro-batch-size 128 --global-batch-size 128 --lr-decay-style cosine --min-lr 0
        --weight-decay 0.05 --clip-grad 1.0 --seed 1234 --log-interval 20 --eval-interval 100
        --progress-bar off"
mkdir -p "$OUT"
rm -rf "$OUT/pretrain" "$OUT"/*.jsonl
# 1. pretraining (MNIST-5k, 10 classes)
python -m megavit.pretrain $MODEL $COMMON --dataset mnist5k --augment affine \
  --train-iters "$PRETRAIN_ITERS" --lr 2e-3 --lr-warmup-iters 50 --save "$OUT/pretrain" "$@"
# 2. fine-tuning on the digits: weights only, a fresh classifier, layer-wise lr decay
python -m megavit.pretrain $MODEL $COMMON --dataset digits --augment affine \
  --train-iters "$ITERS" --lr 1e-3 --lr-warmup-iters 20 \
  --pretrained-checkpoint "$OUT/pretrain" --reset-classifier --layer-decay 0.75 \
  --metrics-file "$OUT/finetune.jsonl" "$@"
# 3. the same budget from scratch
python -m megavit.pretrain $MODEL $COMMON --dataset digits --augment affine \
  --train-iters "$ITERS" --lr 2e-3 --lr-warmup-iters 20 --metrics-file "$OUT/scratch.jsonl" "$@"
# 4. a linear probe: the pretrained model frozen, only a new classifier trained
python -m megavit.pretrain $MODEL $COMMON --dataset digits \
  --train-iters "$ITERS" --lr 1e-2 --lr-warmup-iters 20 \
  --pretrained-checkpoint "$OUT/pretrain" --reset-classifier --freeze-backbone \
  --metrics-file "$OUT/probe.jsonl" "$@"
python "$(dirname "$0")/../tools/plot_metrics.py" "$OUT/finetune.jsonl" "$OUT/scratch.jsonl" \
  "$OUT/probe.jsonl" --labels "fine-tuned" "from scratch" "linear probe" \
  --output "$OUT/curves.png"
