#!/usr/bin/env bash
# CPU quickstart for image-text training: a small CLIP (a ViT-22B-style image tower and a
# causal text tower) on scikit-learn's real 8x8 digits, each paired with a caption drawn
# from prompt templates ("a handwritten digit seven."), then zero-shot classification of the
# held-out digits by prompts, and of MNIST-5k (28x28 digits from another source, never seen).
#
#   make quickstart-clip                    # from a fresh clone: creates .venv, then runs this
#   bash examples/quickstart_clip.sh --loss siglip          # SigLIP instead of CLIP
#   # LiT: lock the image tower of `make quickstart`'s model and train the text tower to it
#   bash examples/quickstart_digits.sh --save runs/quickstart/ckpt
#   bash examples/quickstart_clip.sh --lock-image-tower --image-checkpoint runs/quickstart/ckpt
#
# Expected on 2 CPU cores: >= 90 % zero-shot accuracy on the held-out digits in about a
# minute. The image flags are the digits quickstart's, so its checkpoint fits the image tower.
# Extra arguments are passed through, e.g. `--metrics-file runs/clip.jsonl`.
set -euo pipefail
ITERS=${ITERS:-800}
exec python -m megavit.pretrain_contrastive \
  --image-text-data digits --zero-shot-transfer mnist5k \
  --img-h 8 --img-w 8 --num-channels 1 --patch-dim 2 \
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 \
  --pooling gap \
  --text-preset text-debug --text-hidden-size 64 --text-ffn-hidden-size 256 \
  --loss clip \
  --micro-batch-size 128 --global-batch-size 128 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 0 --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.05 \
  --clip-grad 1.0 --seed 1234 --log-interval 200 --eval-interval 400 \
  "$@"
