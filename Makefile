# reup developer entry points. `make test` is what CI runs (via .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast lint bench bench-fleet demo clean

setup: $(VENV)/.stamp

$(VENV)/.stamp: receiver/pyproject.toml controller/pyproject.toml lab/pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e "./receiver[hdiffpatch]" -e ./controller -e ./lab -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -n 2 tests

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check receiver controller lab tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup
	$(PY) -m bench.run --out bench/results.md

# One controller against N simulated devices in one process (bench/fleet.py); long: run it alone.
bench-fleet: setup
	$(PY) -m bench.fleet --sizes 100,1000,3000 --unique-sizes 100,1000 --out bench/fleet-results.md

demo: setup
	$(VENV)/bin/reup demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
