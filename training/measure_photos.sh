#!/usr/bin/env bash
# The training measurements of docs/training.md (photos, CPU). Run from the repository root.
# 1. the demo budget: `make demo` (teacher pre-training + distillation), then the student alone
#    for the same epochs (same script, distillation and perceptual weights 0; the teacher is
#    loaded only to report its PSNR and the latent CKA);
# 2. equal epochs (E): a teacher trained for E epochs, the distilled student and the student alone
#    for E epochs each on the same crops.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=training/demo.json
E=${E:-3}
ALONE="--distill-latent-weight 0 --distill-recon-weight 0 --perceptual-weight 0"

[ -f checkpoints/tinyvae_best.pth ] || $PY training/distill_tinyvae.py --config $DEMO
$PY training/distill_tinyvae.py --config $DEMO --teacher-checkpoint checkpoints/teacher.pth \
    $ALONE --checkpoint-dir runs/alone_demo_budget
$PY -m hrm_vision.distill.report "distilled (make demo)=checkpoints" \
    "student alone=runs/alone_demo_budget"

$PY training/distill_tinyvae.py --config $DEMO --teacher-epochs "$E" --epochs 0 \
    --checkpoint-dir "runs/equal_$E/teacher"
T="--teacher-checkpoint runs/equal_$E/teacher/teacher.pth"
$PY training/distill_tinyvae.py --config $DEMO $T --epochs "$E" --checkpoint-dir "runs/equal_$E/distill"
$PY training/distill_tinyvae.py --config $DEMO $T --epochs "$E" $ALONE \
    --checkpoint-dir "runs/equal_$E/alone"
$PY -m hrm_vision.distill.report --epoch "$E" "teacher=runs/equal_$E/teacher" \
    "distilled=runs/equal_$E/distill" "student alone=runs/equal_$E/alone"
