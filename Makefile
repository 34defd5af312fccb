# retinagrade: the two commands of the README are `make serve` and `make test`.
# Each creates the virtual environment (.venv) from pyproject.toml on first use.
SHELL := /bin/bash

PYTHON_BASE ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
VENV_BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --quiet
# System packages some tests use (browser tests, promtool, podman): installed when apt-get is usable and
# the tool is missing; without them those tests skip with a stated reason.
SYSTEM_PACKAGES ?= chromium prometheus

.PHONY: setup setup-dev system-packages serve test lint typecheck pytest clean

$(VENV)/.serve-installed: pyproject.toml
	test -x $(PYTHON) || $(PYTHON_BASE) -m venv $(VENV)
	$(PYTHON) -m pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml
	test -x $(PYTHON) || $(PYTHON_BASE) -m venv $(VENV)
	$(PYTHON) -m pip install $(PIP_FLAGS) -e '.[train,dev,deploy]'
	touch $@ $(VENV)/.serve-installed

## setup: install what serving needs (no PyTorch)
setup: $(VENV)/.serve-installed

## setup-dev: install everything for training, tests and deployment checks
setup-dev: $(VENV)/.dev-installed system-packages

system-packages:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing system packages:$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing) \
	    >/dev/null 2>&1 || echo "could not install$$missing: the tests that need them will skip"; \
	fi

## serve: set up and run the service with the shipped model on http://$(HOST):$(PORT)
HOST ?= 127.0.0.1
PORT ?= 8000
serve: setup
	$(VENV_BIN)/retinagrade serve --host $(HOST) --port $(PORT)

## test: set up and run the whole test suite (lint, types, tests)
test: setup-dev lint typecheck pytest

lint:
	$(VENV_BIN)/ruff check src tests benchmarks
	$(VENV_BIN)/ruff format --check src tests benchmarks

typecheck:
	$(VENV_BIN)/mypy

pytest:
	$(PYTHON) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Container, deployment and infrastructure targets (container-*, deploy-*, infra-*): see docs/operations.md.
-include deploy/make/deploy.mk
