# One task runner for humans and CI. `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
export PATH := $(BIN):$(PATH)
# llama.cpp for any x86-64 with AVX2, without AVX-512/AMX: a native build can use AMX
# tiles that some VMs do not grant, and then crashes at the first token.
# Only what OpenBeepBoop loads (text models): LLAVA_BUILD=OFF leaves out the multimodal
# library (mtmd, 19 % of the compile), cmake/llama-cpp-text-only.cmake llama.cpp's common
# library (42 %; see that file). llama.cpp's tests, tools, examples and server are already
# off when it is built inside llama-cpp-python. pip caches the wheel it builds under the
# sdist's name, whatever these flags: to rebuild with other flags, first run
# `pip cache remove llama_cpp_python`.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
	-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/cmake/llama-cpp-text-only.cmake

.PHONY: help install browser test test-docker docker-deps image lint format run bench soak lock clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(BIN)/python:
	@# an isolated venv: the project's environment does not depend on what the machine's
	@# Python holds (pip reuses the llama-cpp-python wheel it cached on a first install)
	$(PYTHON) -m venv $(VENV) || { \
	  echo "venv failed; installing python3-venv" >&2; \
	  apt-get update -qq && apt-get install -y -qq python3-venv python3-dev build-essential && \
	  $(PYTHON) -m venv $(VENV); }

$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	@# a .venv made by an older Makefile saw the system's packages: isolate it in place
	@if grep -qs '^include-system-site-packages = true' $(VENV)/pyvenv.cfg; then \
	  echo "isolating $(VENV) from the system's site-packages" >&2; \
	  sed -i 's/^include-system-site-packages = true/include-system-site-packages = false/' \
	    $(VENV)/pyvenv.cfg; fi
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q --disable-pip-version-check \
	  -c requirements.lock -e ".[all]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# `make run VENV=/some/env INSTALL_STAMP=` reuses an environment as it is (the README test)
INSTALL_STAMP ?= $(STAMP)
install: $(INSTALL_STAMP)  ## create .venv and install the project with every extra

# The web interface's browser tests drive Debian's Chromium through Playwright (whose own
# browser download cannot run on these machines): install it when it is missing.
CHROMIUM ?= /usr/bin/chromium
browser:  ## install Debian's Chromium for the browser tests (apt), unless it is there
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { \
	  echo "installing chromium with apt for the browser tests" >&2; \
	  apt-get update -qq && apt-get install -y -qq chromium; }

test: install browser  ## lint, type-check and run the whole test suite
	$(BIN)/python -m ruff check src tests bench tools
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

# The container tests build the image without a registry: a base image made with
# debootstrap, Docker's engine from Debian (started by the tests when it is not running).
docker-deps:  ## install Docker's engine, compose and debootstrap with apt, unless they are there
	@missing=""; \
	command -v dockerd >/dev/null 2>&1 || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null 2>&1 || missing="$$missing debootstrap"; \
	{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } || \
	  missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt for the container tests" >&2; \
	  { apt-get update -qq && apt-get install -y -qq $$missing; } || \
	  echo "could not install$$missing: the container tests will say what is missing" >&2; \
	fi

test-docker: install docker-deps  ## build the image and run the container tests (tests/docker)
	$(BIN)/python -m pytest -p no:cacheprovider -o timeout=1800 tests/docker

BASE_IMAGE ?=
image: install  ## build the Docker image openbeepboop:latest (BASE_IMAGE=... another base)
	BASE_IMAGE="$(BASE_IMAGE)" bash docker/build.sh

lint: install  ## ruff and mypy only
	$(BIN)/python -m ruff check src tests bench tools
	$(BIN)/python -m ruff format --check src tests bench
	$(BIN)/python -m mypy

format: install  ## apply ruff's fixes and formatting
	$(BIN)/python -m ruff check --fix src tests bench
	$(BIN)/python -m ruff format src tests bench

run: install  ## start the all-in-one server (queue + a node on the bundled Gemma) on :8000
	$(BIN)/openbeepboop serve

bench: install  ## queue throughput and latency, node speed (Gemma) and scaling (echo), cancel latency, dashboard cost, swarm timings, response cache, batch runner, model affinity
	$(BIN)/python bench/bench_queue.py
	$(BIN)/python bench/bench_nodes.py
	$(BIN)/python bench/bench_cancel.py
	$(BIN)/python bench/bench_dashboard.py
	$(BIN)/python bench/bench_swarm.py
	$(BIN)/python bench/bench_cache.py
	$(BIN)/python bench/bench_runs.py
	$(BIN)/python bench/bench_affinity.py

soak: install  ## 10 minutes at half capacity: RSS, open files, database size, p99 (bench/soak.py)
	$(BIN)/python bench/soak.py

lock:  ## re-resolve requirements.lock from pyproject.toml
	@# pip is the installer, not a dependency (llm names it): the venv keeps its own
	uv pip compile pyproject.toml --extra all --python-version 3.11 --no-emit-package pip \
	  -o requirements.lock

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
