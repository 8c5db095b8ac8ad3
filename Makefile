# `make demo` and `make test` each create or update .venv themselves first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Ray's head probes cloud metadata at every start; this block sends that probe to a closed
# loopback port instead (see ECOSYSTEM.md). Every target that may start Ray exports it.
export RAY_USAGE_STATS_ENABLED := 0
export http_proxy := http://127.0.0.1:9
export HTTP_PROXY := http://127.0.0.1:9
export https_proxy := http://127.0.0.1:9
export HTTPS_PROXY := http://127.0.0.1:9
export no_proxy := 127.0.0.1,localhost
export NO_PROXY := 127.0.0.1,localhost
export YOLO_OFFLINE := 1

# Tests run inside a loopback-only network namespace when the machine allows it (root + unshare):
# a second guard, beside the proxy block, that nothing leaves the machine.
NETNS := $(shell unshare -n true 2>/dev/null && echo "unshare -n")
# Package installs must reach the registries: they run without the loopback proxy block.
NOPROXY := env -u http_proxy -u HTTP_PROXY -u https_proxy -u HTTPS_PROXY

.PHONY: venv demo test lint bench sysdeps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(NOPROXY) $(BIN)/python -m pip install -q --upgrade pip
	$(NOPROXY) $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

venv: $(STAMP)

# Debian tools the tests use: strace (no-traffic test) and chromium (report screenshot).
sysdeps:
	@missing=""; command -v strace >/dev/null || missing="$$missing strace"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    $(NOPROXY) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(NOPROXY) apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: missing$$missing; the tests that need them will be skipped"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/fedsim run configs/demo.yaml

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: $(STAMP) sysdeps lint
	$(if $(NETNS),$(NETNS) bash -c 'ip link set lo up && $(BIN)/python -m pytest -q -ra tests',$(BIN)/python -m pytest -q -ra tests)

bench: $(STAMP)
	$(BIN)/python benchmarks/moe_cost.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) data runs
