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

demo: $(VENV)/.installed
	$(PY) -m hrm_vision.vae.summary

test: $(VENV)/.installed
	$(PY) -m ruff check hrm_vision training tests
	$(PY) -m pytest

clean:
	rm -rf $(VENV) checkpoints .pytest_cache
