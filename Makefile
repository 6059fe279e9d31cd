# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install lint test test-fast demo experiment clean

$(STAMP): pyproject.toml setup.py dppa/io/_codec.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Lint and format checks first (ruff, configured in pyproject.toml), then the whole test suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The demo pipeline on params.yaml: builds the demo zoo if missing, runs every stale stage of dvc.yaml through
# Prefect, prints the results table. The stages call `dppa`, so the virtualenv's bin folder goes first on PATH.
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dppa run

# The paper's comparison: the grids of experiments/paper.yaml, each point one DVC experiment through the same stages
# (hours on 2 cores: resumable, a rerun skips recorded points). Tables in experiments/results/, then the paper's
# claims checked against them (experiments/results/claims.md).
experiment: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dppa grid experiments/paper.yaml
	$(BIN)/python experiments/claims.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
