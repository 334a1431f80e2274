#!/usr/bin/env bash
# Distillation on the CPU: a ViT-S-width teacher (4 blocks of width 384, 7.1 M parameters)
# trained on MNIST-5k (TEACHER_ITERS iterations), then a ViT-Ti-width student (3 blocks of
# width 192, 1.3 M: 19 % of the teacher) trained on the same budget (ITERS) and data five
# ways: alone; + response (soft KL, T 4); + response + feature (each student block's map
# against the teacher block one deeper, 0:1,1:2,2:3, projected, cosine distance);
# + response + feature + relation (MiniLMv2 on the same block pairs, 3 relation heads); and
# with the response term read from an offline cache of the teacher's logits. Ends with one
# line per run:
#   [distill-demo] run <name> | parameters <n> (<share> of the teacher's <m>) | student_accuracy <a> | teacher_accuracy <t> | ratio <a/t>
#
#   make quickstart-distill                   # from a fresh clone
#   bash examples/distill_mnist.sh            # inside an environment with megavit installed
#   ITERS=100 bash examples/distill_mnist.sh  # a short run (lower accuracies)
#
# Writes OUT/teacher/ (checkpoint), OUT/cache/, OUT/<run>.jsonl and OUT/summary.txt (OUT
# defaults to runs/distill).
set -euo pipefail
OUT=${OUT:-runs/distill}
ITERS=${ITERS:-600}                    # each student's budget
TEACHER_ITERS=${TEACHER_ITERS:-1800}    # the teacher's (a teacher must be worth learning from)
DATA="--dataset mnist5k --img-h 28 --img-w 28 --num-channels 1 --patch-dim 7 --pooling gap
      --augment affine"
OPTIM="--micro-batch-size 64 --global-batch-size 64 --lr 2e-3 --min-lr 0 --lr-warmup-iters 50
       --lr-decay-style cosine --weight-decay 0.05 --clip-grad 1.0 --seed 1234
       --log-interval 100 --progress-bar off"
COMMON="$OPTIM --train-iters $ITERS --eval-interval $ITERS"
TEACHER="--num-layers 4 --hidden-size 384 --num-attention-heads 6 --ffn-hidden-size 1536"
STUDENT="--num-layers 3 --hidden-size 192 --num-attention-heads 3 --ffn-hidden-size 768"
RESPONSE="--distill-loss soft --distill-temperature 4 --distill-alpha 0.5"
FEATURE="--distill-feature-pairs 0:1,1:2,2:3 --distill-feature-loss cosine"
RELATION="--distill-relation-pairs 0:1,1:2,2:3 --distill-relation-heads 3"
mkdir -p "$OUT"
rm -rf "$OUT/teacher" "$OUT/cache" "$OUT"/*.jsonl
python -m megavit.pretrain $DATA $TEACHER $OPTIM --train-iters "$TEACHER_ITERS" \
  --eval-interval "$TEACHER_ITERS" --save "$OUT/teacher" \
  --metrics-file "$OUT/teacher.jsonl" "$@"
python -m megavit.pretrain $DATA $STUDENT $COMMON --metrics-file "$OUT/alone.jsonl" "$@"
python -m megavit.distill $DATA $STUDENT $COMMON --teacher-checkpoint "$OUT/teacher" \
  $RESPONSE --metrics-file "$OUT/response.jsonl" "$@"
python -m megavit.distill $DATA $STUDENT $COMMON --teacher-checkpoint "$OUT/teacher" \
  $RESPONSE $FEATURE --metrics-file "$OUT/response_feature.jsonl" "$@"
python -m megavit.distill $DATA $STUDENT $COMMON --teacher-checkpoint "$OUT/teacher" \
  $RESPONSE $FEATURE $RELATION --metrics-file "$OUT/response_feature_relation.jsonl" "$@"
python "$(dirname "$0")/../tools/cache_teacher.py" --output "$OUT/cache" --top-k 10 \
  --teacher-checkpoint "$OUT/teacher" $DATA $STUDENT $COMMON "$@"
python -m megavit.distill $DATA $STUDENT $COMMON --teacher-checkpoint "$OUT/teacher" \
  $RESPONSE --distill-cache "$OUT/cache" --metrics-file "$OUT/cache.jsonl" "$@"
python - "$OUT" "$DATA $TEACHER" "$DATA $STUDENT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
from pathlib import Path

from megavit.checkpointing.pieces import meta_model
from megavit.config import parse_args

out = Path(sys.argv[1])


def parameters(flags):
    model = parse_args(flags.split() + ["--num-classes", "10"]).model
    return sum(p.numel() for p in meta_model(model, 1).parameters())


def summary(name):
    rows = [json.loads(l) for l in (out / f"{name}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == "summary"][-1]


teacher, student = parameters(sys.argv[2]), parameters(sys.argv[3])
teacher_accuracy = summary("teacher")["eval_accuracy"]
for name in ("alone", "response", "response_feature", "response_feature_relation", "cache"):
    s = summary(name)
    acc = s.get("student_accuracy", s.get("eval_accuracy"))
    print(f"[distill-demo] run {name} | parameters {student} ({student / teacher:.3f} of the "
          f"teacher's {teacher}) | student_accuracy {acc:.4f} | teacher_accuracy "
          f"{teacher_accuracy:.4f} | ratio {acc / teacher_accuracy:.4f}")
EOF
