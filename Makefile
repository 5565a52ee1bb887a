# Two set-up commands: `make demo` (the main job) and `make test` (the whole suite).
#   make test-fast  the unit tests only: no Ray, no mlflow server, no slow end-to-end run (under 3 minutes);
#                   installs the test extras first if `make test` has not.
#   make docs       the documentation site (MkDocs, Material theme, API reference from the docstrings) in site/.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Written once `pip install -e ".[test]"` succeeded; pyproject.toml changing makes it stale.
TEST_DEPS := $(VENV)/.test-deps
# pytest-xdist workers, one per core (three were slower here: 579 s against 535 s). `--dist worksteal`: a
# worker that runs out of tests takes the other's queued ones, so the end-to-end runs of 20-65 s do not
# leave one worker idle at the end (a work-tree run with it: 458 s, the two workers ending 7 s apart; clean
# clones here: 496-538 s without it, 548 s with it: on this shared machine the gain is within the noise).
WORKERS ?= 2

.PHONY: demo test test-fast docs lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(TEST_DEPS): pyproject.toml | $(PY)
	$(PIP) install -e ".[test]"
	touch $@

demo: $(PY)
	$(PIP) install -e ".[all]"
	$(VENV)/bin/neve-tune study run digits

# mypy (19 s cold, one core: see pyproject.toml) runs beside the tests; its report prints after theirs,
# and either failing fails `make test`.
test: $(PY)
	$(PIP) install -e ".[test]"
	touch $(TEST_DEPS)
	$(VENV)/bin/ruff check .
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet
	$(VENV)/bin/mypy > $(VENV)/mypy.log 2>&1 & mypy=$$!; \
	$(PY) -m pytest -n $(WORKERS) --dist worksteal; tests=$$?; \
	wait $$mypy; types=$$?; echo "mypy:"; cat $(VENV)/mypy.log; \
	if [ $$types -ne 0 ]; then echo "make test: mypy failed (its report is above)"; fi; \
	[ $$tests -eq 0 ] && [ $$types -eq 0 ]

test-fast: $(TEST_DEPS)
	$(PY) -m pytest -n $(WORKERS) --dist worksteal -m "not slow and not ray and not server"

docs: $(TEST_DEPS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: $(PY)
	$(PY) benchmarks/velocity_overhead.py
	$(PY) benchmarks/scheduler_decision.py

clean:
	rm -rf build dist site *.egg-info .pytest_cache .ruff_cache
