PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

# Rebuilt only when the pinned requirements or setup.py change.
$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

demo: setup
	$(BIN)/lrpath demo

clean:
	rm -rf runs/demo
