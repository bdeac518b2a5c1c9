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

# Everything CI runs: the three tiers below.
test: install
	python -m pytest

# Library modules on small generated data, no external tool (about 2 minutes).
test-unit: install
	python -m pytest -m "not integration and not slow"

# Through the real tools: DVC, torchrun, moto's S3 server, a tmpfs full disk.
test-integration: install
	python -m pytest -m "integration and not slow"

# The whole pipeline on the real hymenoptera images (needs ../shared/data/hymenoptera_data.zip).
test-real: install
	python -m pytest -m slow

bench: install
	python benchmarks/speed.py

clean:
	rm -rf $(VENV)
