# Two commands on a fresh machine: `make repro` runs the pipeline, `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Stages run `python -m ...`: the venv's interpreter must come first on PATH.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m transferlab.vega  # .dvc/offline-plots.html: dvc plots show draws offline
	touch $@

repro: install
	dvc repro

test: install
	python -m pytest

test-fast: install
	python -m pytest -m "not slow"

bench: install
	python benchmarks/speed.py

clean:
	rm -rf $(VENV)
