# Container, deployment and infrastructure targets (container-*, deploy-*, infra-*), included by the root
# Makefile. See docs/operations.md.
# Keep make's default goal with the development targets: none of these runs on a bare `make`.
_deploy_mk_default_goal := $(.DEFAULT_GOAL)
PYTHON ?= .venv/bin/python
VENV_BIN ?= .venv/bin
CONTAINER_ENGINE ?= podman
IMAGE ?= localhost/retinagrade:test
BASE_IMAGE ?= docker.io/library/python:3.11-slim-bookworm
LOCAL_BASE_IMAGE ?= localhost/retinagrade-base:bookworm-py311
COMPOSE ?= $(VENV_BIN)/podman-compose
COMPOSE_FILE ?= deploy/compose/docker-compose.yml
TF_DIR ?= deploy/terraform
TERRAFORM ?= $(abspath $(VENV_BIN))/terraform
CHECKOV_VENV ?= .venv/checkov

.PHONY: container-base container-build container-lint container-test \
        deploy-lint deploy-test deploy-compose-config deploy-compose-up deploy-compose-down \
        infra-init infra-lock infra-validate infra-plan infra-apply

## container-base: build the Debian-packaged base image (no registry needed; needs root + debootstrap)
container-base:
	deploy/container/build-base.sh $(LOCAL_BASE_IMAGE)

## container-build: build the serving image (BASE_IMAGE=... to choose the base)
container-build:
	$(CONTAINER_ENGINE) build --format docker --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt \
	  --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(IMAGE) .

## container-lint: hadolint the Dockerfile
container-lint:
	$(VENV_BIN)/hadolint Dockerfile deploy/compose/prometheus/Containerfile.debian deploy/ray/Dockerfile

## container-test: build, run, wait for /health/ready, grade a real photo, check, stop (several minutes)
container-test:
	CONTAINER_ENGINE=$(CONTAINER_ENGINE) IMAGE=$(IMAGE) BASE_IMAGE=$(BASE_IMAGE) deploy/container/container-test.sh

## deploy-lint: lint the Dockerfile, workflows, compose file, alert rules and Terraform
deploy-lint: container-lint
	$(VENV_BIN)/actionlint .github/workflows/ci.yml .github/workflows/deploy.yml
	$(VENV_BIN)/yamllint -s -c deploy/yamllint.yml deploy .github/workflows
	promtool check config deploy/compose/prometheus/prometheus.yml
	promtool check rules deploy/compose/prometheus/alerts.yml
	cd $(TF_DIR) && $(TERRAFORM) fmt -check -recursive
	$(CHECKOV_VENV)/bin/checkov -d $(TF_DIR) --framework terraform --quiet --compact

## deploy-test: the deployment test suite (compose, dashboards, alerts, workflows, Terraform against moto)
deploy-test:
	$(PYTHON) -m pytest tests/deploy -q

## deploy-compose-config: render and validate the Compose file
deploy-compose-config:
	$(COMPOSE) -f $(COMPOSE_FILE) config

## deploy-compose-up: API + Prometheus + Grafana (images: see deploy/compose/README.md)
deploy-compose-up:
	$(COMPOSE) -f $(COMPOSE_FILE) up -d

deploy-compose-down:
	$(COMPOSE) -f $(COMPOSE_FILE) down

## infra-*: Terraform for AWS (ECR, ECS Fargate, ALB, autoscaling, CloudWatch); needs AWS credentials
infra-init:
	cd $(TF_DIR) && $(TERRAFORM) init

## infra-lock: record the provider's checksums for the platforms operators use (needs the registry)
infra-lock:
	cd $(TF_DIR) && $(TERRAFORM) providers lock -platform=linux_amd64 -platform=linux_arm64 -platform=darwin_arm64

infra-validate:
	cd $(TF_DIR) && $(TERRAFORM) init -backend=false -input=false >/dev/null && $(TERRAFORM) validate

infra-plan:
	cd $(TF_DIR) && $(TERRAFORM) plan -out=tfplan

infra-apply:
	cd $(TF_DIR) && $(TERRAFORM) apply tfplan

.DEFAULT_GOAL := $(_deploy_mk_default_goal)
