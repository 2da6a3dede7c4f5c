# Every target installs what it needs into .venv on a fresh machine.
# torch is pinned to 2.13.0: on these machines that takes the CPU build from local disk
# (a bare `torch` requirement downloads a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint soak clean venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,export,report,proxy,dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tuner demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q tests/bench -m bench --benchmark-enable --benchmark-columns=median,mean,stddev,rounds -p no:randomly $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tuner probes policies tui tests
	$(VENV)/bin/mypy

soak: $(STAMP)
	$(VENV)/bin/tuner demo --headless --leak --duration 900

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks
