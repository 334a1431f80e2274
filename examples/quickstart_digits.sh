#!/usr/bin/env bash
# CPU quickstart: a small ViT-22B-style model (parallel blocks, QK-LayerNorm) trained on
# scikit-learn's real 8x8 digits, evaluated on a held-out fifth of them.
#
#   make quickstart                      # from a fresh clone: creates .venv, then runs this
#   bash examples/quickstart_digits.sh   # inside an environment with megavit installed
#   ITERS=300 bash examples/quickstart_digits.sh   # shorter run (lower accuracy)
#
# Expected on 2 CPU cores: >= 95 % held-out accuracy (96.4 %) in 1-3 minutes. It ends by
# drawing the curves of the run: OUT/curves.png from OUT/metrics.jsonl (OUT defaults to
# runs/quickstart). Extra arguments are passed through, e.g. `--save runs/quickstart/ckpt`.
set -euo pipefail
ITERS=${ITERS:-2400}
OUT=${OUT:-runs/quickstart}
mkdir -p "$OUT"
rm -f "$OUT/metrics.jsonl"
python -m megavit.pretrain \
  --dataset digits --img-h 8 --img-w 8 --num-channels 1 --patch-dim 2 \
  --num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256 \
  --pooling gap --augment affine \
  --micro-batch-size 128 --global-batch-size 128 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 0 --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.05 \
  --clip-grad 1.0 --seed 1234 --log-interval 200 --eval-interval 600 \
  --metrics-file "$OUT/metrics.jsonl" "$@"
if [ -s "$OUT/metrics.jsonl" ]; then   # (unless the arguments chose another --metrics-file)
  python "$(dirname "$0")/../tools/plot_metrics.py" "$OUT/metrics.jsonl" \
    --output "$OUT/curves.png"
fi
