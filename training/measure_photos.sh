#!/usr/bin/env bash
# Distilled against trained alone, on the offline photos (CPU): the table of docs/results.md.
# Run from the repository root:
#   bash training/measure_photos.sh            # everything, then the table
#   bash training/measure_photos.sh demo       # the demo's 2 student epochs, each seed
#   bash training/measure_photos.sh long       # 3x that budget (6 student epochs), seed 0
#   bash training/measure_photos.sh report     # the table of whatever has finished
# One teacher (3 epochs on the demo's crops, or TEACHER=path) serves every student. Each student is
# the demo config (its crops, batch and schedule) with the epochs set here, --seed (crops,
# initialisation and order) and one of three loss settings:
#   alone     distillation and perceptual weights 0, the output distillation's weight given to
#             the reconstruction (0.3 + 0.2: the same image-matching weight as the distilled
#             student; the teacher only reports its PSNR and CKA)
#   default   the five-term loss as shipped
#   bounded   the default with --distill-recon-bounded
# Finished runs are kept (a `done` file) and a killed run resumes, so rerunning continues.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO=training/demo.json
OUT=${OUT:-runs/measure}
SEEDS=${SEEDS:-0 1 2}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-3}
EPOCHS=${EPOCHS:-2}
LONG_EPOCHS=${LONG_EPOCHS:-6}
TEACHER=${TEACHER:-$OUT/teacher/teacher.pth}
VARIANTS=${VARIANTS:-alone default bounded}

flags() {
    case $1 in
        alone) echo "--distill-latent-weight 0 --distill-recon-weight 0 --perceptual-weight 0 \
            --recon-weight 0.5" ;;
        default) echo "" ;;
        bounded) echo "--distill-recon-bounded" ;;
    esac
}

teacher() {
    [ -f "$TEACHER" ] || $PY training/distill_tinyvae.py --config $DEMO --epochs 0 \
        --teacher-epochs "$TEACHER_EPOCHS" --checkpoint-dir "$(dirname "$TEACHER")"
}

run() {  # run DIR [flags...]
    local dir=$1; shift
    [ -f "$dir/done" ] && return 0
    $PY training/distill_tinyvae.py --config $DEMO --teacher-checkpoint "$TEACHER" \
        --checkpoint-dir "$dir" --resume auto "$@"
    touch "$dir/done"
}

demo() {
    teacher
    for s in $SEEDS; do for v in $VARIANTS; do
        # shellcheck disable=SC2046
        run "$OUT/demo/$v-s$s" --seed "$s" --epochs "$EPOCHS" $(flags $v)
    done; done
}

long() {
    teacher
    for v in $VARIANTS; do
        # shellcheck disable=SC2046
        run "$OUT/long/$v-s0" --seed 0 --epochs "$LONG_EPOCHS" $(flags $v)
    done
}

dirs() {  # dirs BUDGET VARIANT: the finished runs, comma-separated
    local out=() d
    for d in "$OUT/$1/$2"-s*; do [ -f "$d/done" ] && out+=("$d"); done
    local IFS=,; echo "${out[*]}"
}

report() {  # per budget: the best epochs (what tinyvae_best.pth holds), then the last epochs
    local budget last
    for budget in demo long; do
        local specs=()
        for v in $VARIANTS; do
            local d; d=$(dirs $budget $v)
            [ -n "$d" ] && specs+=("$v=$d")
        done
        [ ${#specs[@]} -gt 0 ] || continue
        last=$LONG_EPOCHS
        [ $budget = demo ] && last=$EPOCHS
        echo; echo "### $last student epochs: best epoch"
        $PY training/runs.py --baseline alone "${specs[@]}"
        echo; echo "### $last student epochs: last epoch"
        $PY training/runs.py --baseline alone --epoch "$last" "${specs[@]}"
    done
}

case ${1:-all} in
    demo) demo ;;
    long) long ;;
    report) report ;;
    all) demo; long; report ;;
    *) echo "usage: $0 [demo|long|report|all]" >&2; exit 2 ;;
esac
