# Quick start: `make demo` and `make test`. Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo bench guests guests-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	@scripts/need-redis-tools
	$(PY) scripts/kvstore_demo.py

bench: $(STAMP)
	$(PY) benchmarks/guest_speed.py

guests:
	$(MAKE) -C guests

guests-check:
	$(MAKE) -C guests check

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
