#!/usr/bin/env bash
# Attention types on high-resolution real data, on the CPU: the same small ViT-22B-style
# model trained on --dataset mnist-canvas (an MNIST-5k digit somewhere on a 56x56 canvas
# among strokes cut from other digits; 8x8 patches of 7 px; 4 blocks) with full attention,
# windows of 4x4 patches in blocks 0 and 2 with global blocks 1 and 3 (ViTDet's evenly
# spaced global blocks, at 4 blocks), local-global windows and linear attention — the same
# budget, data order and seed each — then a table of held-out accuracy against full
# attention's. TYPES may also name `window` (every block windowed, no global block).
#
#   make quickstart-attention                  # from a fresh clone
#   bash examples/attention_canvas.sh          # inside an environment with megavit installed
#   TYPES="full window" ITERS=300 bash examples/attention_canvas.sh
#
# Writes OUT/<type>.jsonl and OUT/summary.json (OUT defaults to runs/attention_canvas) and
# ends with one line per type:
#   [attention-canvas] type <type> | eval_accuracy <held-out> | x_full <ratio to full> | train_seconds <s>
# The README's table was measured with this script on 2 CPU cores.
set -euo pipefail
OUT=${OUT:-runs/attention_canvas}
ITERS=${ITERS:-2000}
TYPES=${TYPES:-full window+global local-global linear}
MODEL="--dataset mnist-canvas --img-h 56 --img-w 56 --num-channels 1 --patch-dim 7
       --num-layers 4 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 256
       --pooling gap --augment affine"
COMMON="--micro-batch-size 64 --global-batch-size 64 --lr 3e-3 --min-lr 0
        --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.05 --clip-grad 1.0
        --seed 1234 --log-interval 100 --eval-interval $ITERS --progress-bar off"
flags_of() {   # the attention flags of one type (4 blocks)
  case "$1" in
    full) echo "" ;;
    window) echo "--attention-type window --window-size 4" ;;
    window+global) echo "--attention-type window --window-size 4 --global-attention-layers 1,3" ;;
    local-global) echo "--attention-type local-global --window-size 4" ;;
    linear) echo "--attention-type linear" ;;
    *) echo "attention_canvas.sh: unknown type '$1' in TYPES (full, window, window+global, local-global, linear)" >&2; exit 2 ;;
  esac
}
mkdir -p "$OUT"
for type in $TYPES; do
  flags=$(flags_of "$type")
  rm -f "$OUT/$type.jsonl"
  echo "[attention-canvas] training type $type ($ITERS iterations)"
  python -m megavit.pretrain $MODEL $COMMON --train-iters "$ITERS" $flags \
    --metrics-file "$OUT/$type.jsonl" "$@"
done
python - "$OUT" $TYPES <<'PY'
import json, sys
out, types = sys.argv[1], sys.argv[2:]
rows = {}
for t in types:
    done = [json.loads(l) for l in open(f"{out}/{t}.jsonl") if '"summary"' in l]
    rows[t] = done[-1]
full = rows.get("full", {}).get("eval_accuracy")
for t, r in rows.items():
    ratio = f"{r['eval_accuracy'] / full:.2f}" if full else "n/a"
    print(f"[attention-canvas] type {t} | eval_accuracy {r['eval_accuracy']:.4f} | "
          f"x_full {ratio} | train_seconds {r['train_seconds']:.1f}")
json.dump({t: {"eval_accuracy": r["eval_accuracy"], "train_seconds": r["train_seconds"]}
           for t, r in rows.items()}, open(f"{out}/summary.json", "w"), indent=1)
PY
