#!/usr/bin/env bash
# The measurements in the README's training section (photos, CPU). Run from the repository root.
# 1. the README budget: `make demo` (teacher pre-training + distillation) and the student alone
#    for the same number of epochs (distillation weights 0, perceptual 0);
# 2. equal epochs: teacher, student alone and distilled student, each for the teacher's epochs.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=training/demo.json
E=$($PY -c "import json; print(json.load(open('$DEMO'))['epochs'])")
TE=$($PY -c "import json; print(json.load(open('$DEMO'))['teacher_epochs'])")
ALONE="--distill-latent-weight 0 --distill-recon-weight 0 --perceptual-weight 0"
T="--teacher-checkpoint checkpoints/teacher.pth"

[ -f checkpoints/tinyvae_best.pth ] || $PY training/distill_tinyvae.py --config $DEMO
$PY training/distill_tinyvae.py --config $DEMO $T $ALONE --checkpoint-dir runs/alone_$E
$PY training/distill_tinyvae.py --config $DEMO $T --epochs "$TE" --checkpoint-dir runs/distill_$TE
$PY training/distill_tinyvae.py --config $DEMO $T $ALONE --epochs "$TE" --checkpoint-dir runs/alone_$TE
$PY -m hrm_vision.distill.report "demo (distilled)=checkpoints" "student alone=runs/alone_$E" \
    "distilled, $TE epochs=runs/distill_$TE" "student alone, $TE epochs=runs/alone_$TE"
