# Two-command entry: `make demo` (main job) and `make test` (test suite). Both create the local
# virtual environment .venv on first use, with every extra (`.[dev]`), and reinstall when
# pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo compact teacher learn test test-fast lint docs bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: a real distillation on the offline `photos` dataset (about 10 min on 2 CPU cores):
# pre-trains the teacher unless checkpoints/teacher.pth exists, then distils the TinyVAE.
demo: $(VENV)/.installed
	$(PY) training/distill_tinyvae.py --config training/demo.json

# The compact pair (64 numbers per 64x64 crop, for pipelines that pass one vector per crop):
# pre-trains the compact teacher, distils the compact student, trains the same student alone,
# and prints their PSNR, the cross-decoding PSNR and the whole-crop baselines.
compact: $(VENV)/.installed
	$(PY) training/compact.py --config training/compact.json

# A teacher trained once, put where `make demo` finds it: afterwards `make demo` only distils
# (train many students from one teacher). TEACHER_EPOCHS=N sets its budget; on the photos a longer
# one does not give a better teacher (its best epoch stays the first over 12 epochs, see
# docs/results.md), so the default is the demo's.
TEACHER_EPOCHS ?= 3
teacher: $(VENV)/.installed
	$(PY) training/distill_tinyvae.py --config training/demo.json --epochs 0 \
		--teacher-epochs $(TEACHER_EPOCHS) --checkpoint-dir checkpoints/teacher_run
	cp checkpoints/teacher_run/teacher.pth checkpoints/teacher.pth

# The learning benchmark: builds data/corpus once (Debian wallpaper packages, apt-get download),
# then trains the compact teacher, the distilled and the alone compact student and the spatial
# student on streamed crops (about 80 min on 2 cores; SCALE=F multiplies every run's steps of
# benchmarks/learn.json, SHIP=1 then writes the best students into hrm_vision/weights) and
# writes checkpoints/learn/learn.json and curves.png. Rerunning skips finished runs.
SCALE ?= 2
learn: $(VENV)/.installed
	$(PY) benchmarks/learn.py --scale $(SCALE) $(if $(SHIP),--ship)

# The whole suite, end-to-end runs included (what CI runs: .ci/run calls `make test`).
test: lint
	$(PY) -m pytest

# Everything but the end-to-end runs marked `slow`, for quick checks while editing.
test-fast: lint
	$(PY) -m pytest -m "not slow"

# Every Python file of the repository (ruff's settings are in pyproject.toml).
lint: $(VENV)/.installed
	$(PY) -m ruff check .

# Regenerate the config-key table of docs/training.md from DistillConfig.
docs: $(VENV)/.installed
	$(PY) training/config_table.py --write docs/training.md

# Benchmarks (not part of the test suite): pytest-benchmark, then the teacher/student ratios, then
# the student at camera resolution (480x640 and 1280x720, eager and ONNX Runtime fp32/fp16/int8 on
# 1 and 2 threads, interleaved, vs this CPU's convolution throughput; each precision's cost; the
# compact student's crops/s at batch 1 and 16; the frame pipeline). CHECKPOINT=path measures a
# trained student, COMPACT_CHECKPOINT=path a trained compact student.
bench: $(VENV)/.installed
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' -p no:cacheprovider --benchmark-only \
		--benchmark-json=.benchmarks/latest.json --benchmark-columns=median,iqr,min,rounds \
		--benchmark-sort=name
	$(PY) benchmarks/ratios.py .benchmarks/latest.json
	$(PY) benchmarks/camera.py --out .benchmarks/camera.json $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) \
		$(if $(COMPACT_CHECKPOINT),--compact-checkpoint $(COMPACT_CHECKPOINT))

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
