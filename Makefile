# reup developer entry points. `make test` is what CI runs (via .ci/run).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup test test-fast lint bench bench-fleet demo clean chaos

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

# The fault campaign (issue 11): >= 1,000 faults, results in tests/chaos/results.md, then the
# stream reader fuzzed for REUP_FUZZ_SECONDS (hypothesis). Not part of `make test`'s budget.
chaos: setup
	REUP_CHAOS=full $(PY) -m pytest -p no:cacheprovider --timeout 0 -s tests/chaos
	$(PY) tests/chaos/atheris_reader.py -max_total_time=$${REUP_FUZZ_SECONDS:-60}

bench: setup
	$(PY) -m bench.run --out bench/results.md

# One controller against N simulated devices in one process (bench/fleet.py); long: run it alone.
bench-fleet: setup
	$(PY) -m bench.fleet --sizes 100,1000,3000 --unique-sizes 100,1000,3000 --out bench/fleet-results.md

demo: setup
	$(VENV)/bin/reup demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache

# Boot counting on a UEFI VM (OVMF, systemd-boot, Linux under qemu TCG): every scenario, timings
# printed. `make test` runs only the bad-kernel one.
.PHONY: vm-test
vm-test: setup
	REUP_VM_TEST=1 $(PY) -m pytest -s tests/vm
