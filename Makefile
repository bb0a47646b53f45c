# The two commands a newcomer needs: `make run` and `make test`. Each sets everything up itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_DEPS := redis-server:redis-server redis-cli:redis-tools prometheus:prometheus promtool:prometheus

.PHONY: run test pytest lint format setup system-deps clean

## run: set up, start Redis + demo LLM upstream + sidecar, drive demo streams (ARGS=--once to exit)
run: setup
	$(BIN)/sse-sidecar quickstart $(ARGS)

## test: set up, lint, and run the whole test suite
test: setup lint pytest

pytest: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

setup: system-deps $(STAMP)

system-deps:
	@scripts/ensure-system-deps.sh $(SYSTEM_DEPS)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/ensure-system-deps.sh _no_venv_:python3-venv
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache *.egg-info
