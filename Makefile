# Two-command entry: `make demo` (main job) and `make test` (test suite). Both create the local
# virtual environment .venv on first use and reinstall when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The main job: a real distillation on the offline `photos` dataset (< 10 min on 2 CPU cores):
# pre-trains the teacher unless checkpoints/teacher.pth exists, then distils the TinyVAE.
demo: $(VENV)/.installed
	$(PY) training/distill_tinyvae.py --config training/demo.json

test: $(VENV)/.installed
	$(PY) -m ruff check hrm_vision training tests
	$(PY) -m pytest

# Benchmarks (not part of the test suite): pytest-benchmark, then the teacher/student ratios.
bench: $(VENV)/.installed
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks -o python_files='bench_*.py' -p no:cacheprovider --benchmark-only \
		--benchmark-json=.benchmarks/latest.json --benchmark-columns=median,iqr,min,rounds \
		--benchmark-sort=name
	$(PY) benchmarks/ratios.py .benchmarks/latest.json

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
