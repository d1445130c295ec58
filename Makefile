# moshi-ttt: every target installs what it needs itself (venv, pip packages, apt packages).
#   make demo   - the main job, offline: tiny data -> tiny base -> train -> serve -> talk to it
#   make test   - the whole test suite (what CI runs, via .ci/run)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# Extra pip args for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128"
TORCH_PIP_ARGS ?=
MOSHI_VERSION ?= 0.2.13
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: install test demo bench clean

install: $(VENV)/.installed

# System packages: espeak-ng synthesises `moshi-ttt make-data`'s offline dataset; chromium (and a
# font for its screenshots) runs the browser client's test, tests/test_browser.py. Installed with
# apt (sudo when not root) only if missing; order-only below, so it never forces a pip reinstall.
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
.PHONY: sysdeps
sysdeps:
	@missing="$$(command -v espeak-ng >/dev/null || echo espeak-ng) $$(test -x "$${MOSHI_TTT_CHROMIUM:-/usr/bin/chromium}" || echo chromium fonts-dejavu-core)"; \
	missing="$$(echo $$missing)"; [ -z "$$missing" ] || { \
	  command -v apt-get >/dev/null || { echo "missing system packages ($$missing) and apt-get is not available: install them with your system's package manager" >&2; exit 1; }; \
	  $(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends $$missing; }

# torch first (a CPU build on CPU machines, the default CUDA build elsewhere), then moshi WITHOUT
# its torch<2.10 pin (it runs on newer torch; see README), then the project and its own deps.
$(VENV)/.installed: pyproject.toml Makefile | sysdeps
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PIP) install --no-deps "moshi==$(MOSHI_VERSION)"
	$(PIP) install -e ".[dev]"
	@$(BIN)/python -c "import torch, moshi.models; print('torch', torch.__version__, '| moshi ok')"
	@touch $@

# The main job, offline: synthesised data -> tiny base -> train -> serve -> talk to it.
demo: install
	$(BIN)/moshi-ttt demo

test: install
	NO_TORCH_COMPILE=1 $(BIN)/python -m pytest -q

bench: install
	$(BIN)/moshi-ttt bench ttt

clean:
	rm -rf $(VENV) runs .pytest_cache
