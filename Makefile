# darkmatter: the two commands a user needs are `make quickstart` and `make test`.
# Each sets itself up from a fresh clone: virtualenv, dependencies, local stack.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel for development machines; on a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: corpora slurm espeak venv quickstart test test-slow soak lint typecheck stack-up stack-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# DeepSpeed compiles its CPU shared-memory collective on first use; do it once, here.
	TORCH_EXTENSIONS_DIR=$(abspath $(VENV))/torch_extensions \
	  $(BIN)/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# Real labeled text for the quickstart: Debian's fortune-cookie files (one category per file).
corpora:
	@bash launch/ensure_corpora.sh

# A single-host SLURM (Debian's slurm-wlm + munge) for tests/test_slurm.py, where it can be
# installed; otherwise that test is skipped with the reason.
slurm:
	@bash launch/ensure_slurm.sh

# espeak-ng (Debian) speaks the spoken-digits corpus of the wav2vec2 preset and its test.
espeak:
	@bash launch/ensure_espeak.sh

quickstart: venv corpora espeak
	$(BIN)/darkmatter stack up
	$(BIN)/python -m darkmatter.quickstart.run

test: venv corpora slurm espeak
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q --durations=25 -m "not slow and not presets" tests

# What make test leaves out for its time (each a multi-process DeepSpeed job); CI runs it after.
test-slow: venv corpora espeak
	$(BIN)/python -m pytest -q --durations=10 -m slow tests

# Every quickstart preset trained in full and probed against random init (~1.5 h): run when a
# preset or an objective changes; the margins land in runs/presets.jsonl for docs/OBJECTIVES.md.
test-presets: venv corpora espeak
	DARKMATTER_PRESET_LOG=$(CURDIR)/runs/presets.jsonl $(BIN)/python -m pytest -q -s -m presets tests/test_presets.py

# The chaos soak (CI's slow tier, ~10 min): kills, S3 faults, an MLflow restart and bad inputs
# against one 2-rank job, which must end equal to an uninterrupted run (docs/RELIABILITY.md).
soak: venv corpora
	$(BIN)/python -m tests.soak

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

stack-up: venv
	$(BIN)/darkmatter stack up

stack-down: venv
	$(BIN)/darkmatter stack down

# Not .darkmatter/: the local stack's data (objects, runs) goes only with `darkmatter stack down --purge`.
clean:
	rm -rf $(VENV) build *.egg-info
