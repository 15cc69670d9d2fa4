# agent-egress: the two commands a newcomer needs are `make demo` and `make test`.
# Every target bootstraps .venv with the newest python3.13/python3.12 it can find when .venv is
# missing or stale (pyproject.toml or constraints.txt changed, or its interpreter is gone).

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make test` runs the suite in this many processes (pytest-xdist; each test file whole in one, in
# its order): most tests wait on sockets and subprocesses, so 2 halve the suite on 2 cores.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

# Newest Python >= 3.12: plain names on PATH first, then pyenv's install tree (shims may be inactive).
find_python = $(shell for c in python3.13 python3.12 \
	$$(ls -d $$HOME/.pyenv/versions/3.13*/bin/python3.13 $$HOME/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do \
	if "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then echo "$$c"; break; fi; done)

.PHONY: demo test test-deps lint bench fuzz lock clean venv

venv: $(STAMP)

# The checkout is installed editable as a plain path entry (setuptools' "compat" mode, as a wheel
# install has no import hook either): the default mode adds an import hook that loads pathlib, glob and
# re when the interpreter starts, ~13 ms of every `egress` command, `egress run` included
# (docs/startup.md). Should a setuptools release drop that mode, the default one is installed instead.
# scripts/link-packages then narrows the path entry to the gate's two packages (an agent working in the
# checkout must not be able to put a module on the environment's import path).
$(STAMP): pyproject.toml constraints.txt Makefile
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
		base="$(find_python)"; \
		if [ -z "$$base" ]; then echo "error: need python3.13 or python3.12 on PATH (or under ~/.pyenv/versions)" >&2; exit 2; fi; \
		echo "bootstrapping $(VENV) with $$base"; rm -rf $(VENV); "$$base" -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Compat editable installs" $(PY) -m pip install -q -c constraints.txt \
		-e '.[dev]' --config-settings editable_mode=compat \
		|| $(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) scripts/link-packages
	$(PY) -m proxy.runtime.codecache
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m proxy.app.demo

# Debian packages and the deployment validators the tests need: installed when missing (as root),
# otherwise named with the command that installs them. A no-op check when everything is present.
test-deps: $(STAMP)
	@PYTHON=$(PY) scripts/install-test-deps

test: $(STAMP) test-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy addons tests bench
	$(VENV)/bin/ruff format --check proxy addons tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

# The front-door and DNS-gate fuzzers for 10 minutes each with a fresh seed (the suite runs them for
# 40 s on a fixed one). FUZZ_SEED / FUZZ_SECONDS replay or lengthen a run.
fuzz: $(STAMP) test-deps
	$(PY) -m tests.fuzz

# Regenerate the pinned constraints from the current venv (after changing pyproject.toml).
lock:
	$(PY) -m pip freeze --exclude-editable | grep -v '^agent-egress' > constraints.txt

clean:
	rm -rf $(VENV) .venv-tools .pytest_cache .mypy_cache .ruff_cache
