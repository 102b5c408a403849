# Two commands set up everything and run: `make train` (the default run) and `make test` (the
# suite). Each makes .venv first when it is missing or older than pyproject.toml; repeating them
# reinstalls nothing. Extra arguments: make train ARGS="model=small train.max_steps=100".
PYTHON ?= python3
VENV ?= .venv
ARGS ?=
# The suite runs on 2 pytest-xdist workers (a test file, or the SLURM tests, per worker; see
# tests/conftest.py), the longest groups handed out first (--no-loadscope-reorder keeps the
# order conftest.py gives); PYTEST_JOBS= runs it in one process.
PYTEST_JOBS ?= -n 2 --dist loadgroup --no-loadscope-reorder
STAMP := $(VENV)/.minigpt-setup

.PHONY: train test lint env mutation
train: $(STAMP)
	$(VENV)/bin/python train.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_JOBS) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

env: $(STAMP)

# Mutation score of the core modules against the unit tests (benchmarks/README.md): a figure,
# never a gate. ARGS="--module optim --max-children 2" for one module.
mutation: $(STAMP)
	$(VENV)/bin/python scripts/mutation.py $(ARGS)

$(STAMP): pyproject.toml scripts/setup_env.sh
	PYTHON="$(PYTHON)" VENV="$(VENV)" scripts/setup_env.sh
	touch $@
