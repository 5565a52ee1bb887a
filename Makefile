# Two set-up commands: `make demo` (the main job) and `make test` (the whole suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

demo: $(PY)
	$(PIP) install -e ".[all]"
	$(VENV)/bin/neve-tune study run digits

test: $(PY)
	$(PIP) install -e ".[test]"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(PY)
	$(PY) benchmarks/velocity_overhead.py
	$(PY) benchmarks/scheduler_decision.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
