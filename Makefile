# retinagrade Makefile.
SHELL := /bin/bash
PYTHON ?= .venv/bin/python
VENV_BIN ?= .venv/bin

# ---------------------------------------------------------------------------------------------------------
# Development targets (setup, test, serve, ...): maintained by the service/CI engineers; add them here.
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Container, deployment and infrastructure targets (container-*, deploy-*, infra-*) live in
# deploy/make/deploy.mk; see docs/operations.md.
# ---------------------------------------------------------------------------------------------------------
include deploy/make/deploy.mk
