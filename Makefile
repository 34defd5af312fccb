# retinagrade: the two commands of the README are `make serve` and `make test`.
# Each creates the virtual environment (.venv) from pyproject.toml on first use.
SHELL := /bin/bash

PYTHON_BASE ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
VENV_BIN := $(VENV)/bin
PIP_FLAGS ?= --disable-pip-version-check --quiet
# Exact versions of every Python dependency (pyproject.toml keeps compatible ranges).
CONSTRAINTS ?= constraints.txt
# checkov (Terraform checks in tests/deploy) in a venv of its own: its pins conflict with the project's.
CHECKOV_VENV ?= $(VENV)/checkov
CHECKOV_CONSTRAINTS ?= deploy/checkov-constraints.txt
# Debian packages some tests use: chromium (browser tests), prometheus (promtool), podman + runc (podman-compose;
# the runtime the container docs use), shellcheck (actionlint's shell checks), orthanc + orthanc-dicomweb (the PACS
# round trip), dcmtk (DICOM codec fixtures, dsrdump). debootstrap is for the opt-in `make container-test` only. `make system-packages` installs the ones dpkg does not list, when
# apt-get is usable; without them those tests skip with a stated reason. Adding a tool is one word here.
SYSTEM_PACKAGES ?= chromium prometheus podman runc shellcheck orthanc orthanc-dicomweb dcmtk
.PHONY: setup setup-dev system-packages serve test lint typecheck pytest clean

$(VENV)/.serve-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PYTHON) || $(PYTHON_BASE) -m venv $(VENV)
	$(PYTHON) -m pip install $(PIP_FLAGS) -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(CONSTRAINTS)
	test -x $(PYTHON) || $(PYTHON_BASE) -m venv $(VENV)
	$(PYTHON) -m pip install $(PIP_FLAGS) -c $(CONSTRAINTS) -e '.[train,dev,deploy,dicom,cluster]'
	touch $@ $(VENV)/.serve-installed

$(CHECKOV_VENV)/.installed: $(CHECKOV_CONSTRAINTS)
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON_BASE) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install $(PIP_FLAGS) -c $(CHECKOV_CONSTRAINTS) checkov
	touch $@

## setup: install what serving needs (no PyTorch)
setup: $(VENV)/.serve-installed

## setup-dev: install everything for training, tests and deployment checks
setup-dev: $(VENV)/.dev-installed $(CHECKOV_VENV)/.installed system-packages

## system-packages: install the missing SYSTEM_PACKAGES (apt-get, as root); never fails the build
system-packages:
	@missing=""; \
	for package in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$package" 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$package"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else sudo=none; fi; \
	if ! command -v apt-get >/dev/null || [ "$$sudo" = none ]; then \
	  echo "not installed:$$missing (needs apt-get and root or sudo): the tests that need them will skip"; exit 0; \
	fi; \
	echo "installing system packages:$$missing"; \
	$$sudo apt-get update -qq >/dev/null 2>&1 || echo "apt-get update failed: trying the package lists on disk"; \
	install() { $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$$@" >/dev/null 2>&1; }; \
	install $$missing || for package in $$missing; do \
	  install "$$package" || echo "could not install $$package: the tests that need it will skip"; \
	done

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
