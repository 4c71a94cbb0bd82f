# Quick start: `make demo` and `make test`. Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast lint demo demo-kvstore bench bench-checkpoint bench-colo bench-reprotect bench-delta bench-relay guests guests-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	@touch $(STAMP)

setup: $(STAMP)

# As root, redis-tools is installed first when missing; otherwise the run ends saying what was skipped and why.
test: $(STAMP)
	@scripts/need-redis-tools --optional
	$(PY) -m pytest

test-fast: $(STAMP)
	@scripts/need-redis-tools --optional
	$(PY) -m pytest -m "not slow"

# ruff and mypy, configured in pyproject.toml; both must be clean.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m mypy

# The replicated key-value guest survives a SIGKILLed primary; it uses redis-cli only if it is installed.
demo: $(STAMP)
	$(PY) -m colo demo

# The key-value guest alone, with the real redis-cli and redis-benchmark.
demo-kvstore: $(STAMP)
	@scripts/need-redis-tools
	$(PY) scripts/kvstore_demo.py

bench: $(STAMP)
	$(PY) benchmarks/guest_speed.py

# Checkpoint pause and commit latency through a real local cluster, pipelined and strict, against the copy + lz4
# floor (about 5 min; add --baseline REF to compare with a commit); results: BENCHMARKS.md.
bench-checkpoint: $(STAMP)
	$(PY) benchmarks/checkpoint_cost.py

# A new secondary for a running primary: live copy against stop-and-copy, 64 MiB to 1 GiB (a few minutes).
bench-reprotect: $(STAMP)
	$(PY) benchmarks/reprotect.py

# --delta against plain pages: kvstore under redis-benchmark, memtouch (about 2 min).
bench-delta: $(STAMP)
	@scripts/need-redis-tools
	$(PY) benchmarks/delta_cost.py

# The gateway's own Python per hybrid request: the witness and the relay's frames, in one process (about 5 s).
bench-relay: $(STAMP)
	$(PY) benchmarks/relay_cost.py

# Why COLO: client throughput, latency and checkpoints/s of kvstore and noisy alone, under periodic checkpoints
# (20/50/100 ms) and in hybrid mode; 3 interleaved rounds, about 8 min; writes benchmarks/colo_vs_periodic.png.
bench-colo: $(STAMP)
	@scripts/need-redis-tools
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/colo_vs_periodic.py

guests:
	$(MAKE) -C guests

guests-check:
	$(MAKE) -C guests check

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
