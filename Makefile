# The primary stack: megatron-core 0.19 on Python 3.12 (.venv). The compatibility lane: megatron-core 0.16.1 on
# Python 3.11 (.venv-compat), the last release for 3.11.
PY ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) $(shell command -v python3.12))
PY_COMPAT ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.11*/bin/python3.11) $(shell command -v python3.11))
VENV := .venv
VENV_COMPAT := .venv-compat
STAMP := $(VENV)/.installed
STAMP_COMPAT := $(VENV_COMPAT)/.installed
PIP := pip install -q --disable-pip-version-check

.PHONY: setup setup-compat test test-compat demo clean

setup: $(STAMP)
setup-compat: $(STAMP_COMPAT)

# Each venv is rebuilt only when its pinned requirements or setup.py change.
$(STAMP): requirements.txt requirements-common.txt setup.py
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/$(PIP) -r requirements.txt
	$(VENV)/bin/$(PIP) --no-deps -e .
	touch $@

$(STAMP_COMPAT): requirements-compat.txt requirements-common.txt setup.py
	test -x $(VENV_COMPAT)/bin/python || $(PY_COMPAT) -m venv $(VENV_COMPAT)
	$(VENV_COMPAT)/bin/$(PIP) -r requirements-compat.txt
	$(VENV_COMPAT)/bin/$(PIP) --no-deps -e .
	touch $@

# The primary suite; its upgrade test writes run directories with the compatibility venv's megatron-core.
test: setup setup-compat
	LRPATH_COMPAT_PYTHON=$(abspath $(VENV_COMPAT))/bin/python $(VENV)/bin/python -m pytest -q -rs --durations=25 tests

# What differs between megatron-core releases, on 0.16.1 (tests marked `compat`).
test-compat: setup-compat
	$(VENV_COMPAT)/bin/python -m pytest -q -rs --durations=10 -m compat tests

demo: setup
	$(VENV)/bin/lrpath demo

clean:
	rm -rf runs/demo
