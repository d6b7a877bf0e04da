# fusedlab: `make demo` (the main job) and `make test` work from a fresh clone; every install step lives here.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
export MAX_JOBS ?= 2

.PHONY: install demo test test-fast bench gpu-check clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja

# Dependencies, refreshed when pyproject.toml changes. torch==2.13.0 only when no torch is importable (an
# unpinned torch would pull a multi-GB CUDA build); triton 3.6.0 and numpy<2.4 are test-only pins for the
# Triton interpreter, never runtime dependencies.
$(VENV)/.deps: pyproject.toml | $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q "numpy<2.4" "triton==3.6.0"
	$(PIP) install -q pytest pytest-timeout hypothesis expecttest particles scipy pytest-benchmark tqdm matplotlib \
		scikit-learn diffusers transformers "symile==0.1.0"
	touch $@

# Editable install without build isolation (the extension compiles against the torch above), then an
# incremental rebuild of the C++ extension so edits under csrc/ are always picked up.
install: $(VENV)/.deps
	@$(PY) -c "import fusedlab" 2>/dev/null || $(PIP) install -q --no-build-isolation --no-deps -e .
	@mkdir -p build && $(PY) setup.py build_ext --inplace > build/build.log 2>&1 || (tail -50 build/build.log; exit 1)
	@$(PY) -c "import fusedlab; print('fusedlab', fusedlab.__version__, 'backends:', fusedlab.backends())"

demo: install
	$(PY) -m fusedlab demo

test: install
	$(PY) -m pytest -q --durations=15 tests python/fusedlab docs README.md

test-fast: install
	$(PY) -m pytest -q -x tests --deselect tests/test_cuda_compile.py --deselect tests/test_resample_cuda_sim.py

# every family's benchmark points on every device here (a few minutes on 2 cores; one family at a time:
# python -m fusedlab bench --family NAME)
FAMILIES ?= resample newton_schulz cat symile
bench: install
	$(PY) -m pytest -q bench --benchmark-json=bench/results/bench_cpu.json
	for f in $(FAMILIES); do $(PY) -m fusedlab bench --family $$f --out bench/results || exit 1; done

gpu-check:
	bash bench/gpu_check.sh

clean:
	rm -rf build python/fusedlab/*.so *.egg-info python/*.egg-info .pytest_cache
