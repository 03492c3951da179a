#!/usr/bin/env bash
# The measurements in the README's training section (photos, CPU). Run from the repository root.
# 1. the README budget: `make demo` (teacher pre-training + distillation), then the student alone
#    for the same epochs (same script, distillation and perceptual weights 0; the teacher is
#    loaded only to report its PSNR and the latent CKA);
# 2. equal epochs: every run at epoch = teacher_epochs of the same histories (`--epoch`).
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=training/demo.json
TE=$($PY -c "import json; print(json.load(open('$DEMO'))['teacher_epochs'])")
ALONE="--distill-latent-weight 0 --distill-recon-weight 0 --perceptual-weight 0"

[ -f checkpoints/tinyvae_best.pth ] || $PY training/distill_tinyvae.py --config $DEMO
$PY training/distill_tinyvae.py --config $DEMO --teacher-checkpoint checkpoints/teacher.pth \
    $ALONE --checkpoint-dir runs/alone_demo_budget
RUNS=("distilled (make demo)=checkpoints" "student alone=runs/alone_demo_budget")
$PY -m hrm_vision.distill.report "${RUNS[@]}"
$PY -m hrm_vision.distill.report --epoch "$TE" "${RUNS[@]}"
