# Two commands for a fresh clone (Python 3.10+):
#   make demo   set up, then run the main job
#   make test   set up, then run the whole test suite
# Each creates (once) and reuses a virtual environment in $(VENV), installs torch first and then this
# package without build isolation, so the C++ (and, where torch has CUDA and nvcc exists, CUDA) kernels
# compile against the torch that runs them.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
BIN := $(VENV)/bin
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
export MAX_JOBS ?= 2

.PHONY: setup demo test test-cpu-only bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip -q

$(VENV)/.deps: $(BIN)/python requirements/dev.txt
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q "$(TORCH_SPEC)" -r requirements/dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

demo: setup
	$(BIN)/python -m mind train --data ml-100k

test: setup
	$(BIN)/python -m mind_kernels.info
	$(BIN)/python -m mind_kernels.selftest --quick
	$(BIN)/python -m pytest -q

# The reference, API and CPU-kernel tests against a CPU-only torch build (CI keeps this install path working).
test-cpu-only:
	$(MAKE) setup VENV=.venv-cpu TORCH_SPEC="torch==2.13.0"
	.venv-cpu/bin/python -m mind_kernels.info
	.venv-cpu/bin/python -m pytest -q tests/test_reference.py tests/test_api.py tests/test_layers.py tests/test_cpu_kernel.py

bench: setup
	$(BIN)/python -m pytest bench/ --benchmark-only --benchmark-json=bench/results/routing_cpu.json -q
	$(BIN)/python bench/report.py bench/results/routing_cpu.json

clean:
	rm -rf build *.egg-info mind_kernels/_C*.so mind_kernels/_build_info.json
