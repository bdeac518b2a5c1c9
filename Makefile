# Two commands on a fresh machine: `make repro` runs the pipeline, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages run `python -m ...`: the venv's interpreter must come first on PATH.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro lint test test-unit test-integration test-real bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m transferlab.vega  # .dvc/offline-plots.html: dvc plots show draws offline
	touch $@

repro: install
	dvc repro

lint: install
	ruff check .

# One pytest worker per core (pytest-xdist), each keeping to its core (tests/conftest.py); a
# module's tests stay together on one worker, the longest modules handed out first.
PYTEST := python -m pytest -n auto --dist loadfile --no-loadscope-reorder

# Everything CI runs: the three tiers below. A test whose verdict is read from timings (marked
# timing) runs afterwards, alone: a parallel worker's load would be noise to it.
test: install
	$(PYTEST) -m "not timing"
	python -m pytest -m timing

# Library modules on small generated data, no external tool.
test-unit: install
	$(PYTEST) -m "not integration and not slow and not timing"
	python -m pytest -m "timing and not integration and not slow"

# Through the real tools: DVC, torchrun, moto's S3 server, a tmpfs full disk.
test-integration: install
	$(PYTEST) -m "integration and not slow"

# The whole pipeline on the real hymenoptera images (needs ../shared/data/hymenoptera_data.zip),
# and vgg's ONNX export. Two tests: one process, with every core.
test-real: install
	python -m pytest -m slow

bench: install
	python benchmarks/speed.py

clean:
	rm -rf $(VENV)
