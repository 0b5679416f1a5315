# Two commands for a fresh clone (Python 3.10+):
#   make demo   set up, then run the main job
#   make test   set up, then run the whole test suite
# Each creates (once) and reuses a virtual environment, installs torch first and then this package without
# build isolation, so the C++ (and, where torch has CUDA and nvcc exists, CUDA) kernels compile against the
# torch that runs them.
#   make test            .venv, the CUDA build of torch ($(TORCH_SPEC)): the CUDA kernels compile and link
#                        on every machine, GPU or not (CI).
#   make demo            on a machine with a GPU (nvidia-smi works): the same .venv. Without one: .venv-cpu,
#                        the CPU build of torch ($(CPU_TORCH_SPEC), no CUDA compile), as make test-cpu-only.
#                        HAVE_GPU=1 / HAVE_GPU= overrides the detection.
# Every setup step prints one line: what it does and about how long it took on a 2-core machine here.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1
CPU_VENV ?= .venv-cpu
CPU_TORCH_SPEC ?= torch==2.13.0
HAVE_GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
BIN := $(VENV)/bin
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
PIP := $(BIN)/python -m pip --disable-pip-version-check
# pip's output is filtered to its result line, or everything from its first error on (this machine's local
# index also makes it warn about every package it does not hold); pipefail keeps pip's exit status.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
RESULT_LINES := sed -n -e '/^Successfully/p' -e '/^\(ERROR\|error\)/,$$p'
export MAX_JOBS ?= 2

# What installing $(TORCH_SPEC) means, for the step line (times measured here; sizes are the venv's growth).
ifeq ($(TORCH_SPEC),torch==2.13.0)
TORCH_WHAT := CPU build, about 0.9 GB, ~30 s where the wheel is on local disk
else ifeq ($(TORCH_SPEC),torch==2.14.1)
TORCH_WHAT := CUDA 13 build, about 5.4 GB with its CUDA libraries, ~2.5 min from local disk, longer to download
else
TORCH_WHAT := as asked by TORCH_SPEC
endif

# The in-place extension (mind_kernels/_C*.so) is shared by every venv of this clone (editable installs);
# this file names the venv it was last built for, and another venv's setup rebuilds it for its own torch.
INPLACE_FOR := build/.inplace-built-for
ifneq ($(wildcard $(INPLACE_FOR)),)
ifneq ($(shell cat $(INPLACE_FOR)),$(abspath $(VENV)))
.PHONY: $(VENV)/.built
endif
endif

.PHONY: setup demo test test-cpu-only scale-cpu bench clean check-install

$(BIN)/python:
	@echo "[setup 1/4] creating the virtual environment $(VENV) with $(PYTHON) and upgrading its pip (~5 s)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --upgrade pip --progress-bar off 2>&1 | $(RESULT_LINES)

$(VENV)/.deps: $(BIN)/python requirements/dev.txt
	@echo "[setup 2/4] installing $(TORCH_SPEC) into $(VENV) ($(TORCH_WHAT))"
	@start=$$(date +%s); $(PIP) install "$(TORCH_SPEC)" --progress-bar off 2>&1 | $(RESULT_LINES); \
	  echo "            took $$(( $$(date +%s) - start )) s"
	@echo "[setup 3/4] installing requirements/dev.txt: pandas, faiss-cpu, pytest, onnx, torch-rechub... (about 0.7 GB; ~2 min, ~30 s with pip's cache warm)"
	@start=$$(date +%s); $(PIP) install "$(TORCH_SPEC)" -r requirements/dev.txt --progress-bar off 2>&1 | $(RESULT_LINES); \
	  echo "            took $$(( $$(date +%s) - start )) s"
	@touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	@torch=$$($(BIN)/python -c 'import torch; print(torch.__version__, "cuda" if torch.version.cuda else "cpu")'); \
	if [ "$${torch#* }" = cuda ] && [ "$${MIND_KERNELS_SKIP_CUDA:-0}" != 1 ] \
	    && { command -v nvcc || [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; } >/dev/null; then \
	  echo "[setup 4/4] compiling the C++ and CUDA kernels (sm_80, sm_90) against torch $${torch% *}, MAX_JOBS=$(MAX_JOBS) (~6 min)"; \
	else \
	  echo "[setup 4/4] compiling the C++ kernels against torch $${torch% *} (no CUDA compile: no CUDA in this torch, or no nvcc), MAX_JOBS=$(MAX_JOBS) (~2 min)"; \
	fi
	@start=$$(date +%s); $(PIP) install --no-build-isolation --no-deps -e . --progress-bar off 2>&1 | $(RESULT_LINES); \
	  echo "            took $$(( $$(date +%s) - start )) s; built: $$(tr -d '\n' < mind_kernels/_build_info.json)"
	@mkdir -p $(dir $(INPLACE_FOR)) && echo "$(abspath $(VENV))" > $(INPLACE_FOR)
	@touch $@

setup: $(VENV)/.built

ifeq ($(HAVE_GPU),)
demo:
	@echo "make demo: no GPU here (nvidia-smi absent or failing): the CPU build of torch in $(CPU_VENV), C++ kernels only"
	$(MAKE) --no-print-directory setup VENV=$(CPU_VENV) TORCH_SPEC="$(CPU_TORCH_SPEC)"
	$(CPU_VENV)/bin/python -m mind train --data ml-100k
else
demo: setup
	$(BIN)/python -m mind train --data ml-100k
endif

test: setup
	$(BIN)/python -m mind_kernels.info
	$(BIN)/python -m mind_kernels.selftest --quick
	$(BIN)/python -m pytest -q

# The reference, API and CPU-kernel tests against a CPU-only torch build (CI keeps this install path working),
# and the sharded-table tests with the [scale] packages (TorchRec + FBGEMM's CPU build for this torch; the CUDA
# venv of `make test` does not have them and skips those tests, saying so).
test-cpu-only: scale-cpu
	$(CPU_VENV)/bin/python -m mind_kernels.info
	$(CPU_VENV)/bin/python -m pytest -q tests/test_reference.py tests/test_api.py tests/test_layers.py tests/test_cpu_kernel.py \
		tests/test_best_interest_ce.py tests/test_sharded.py

scale-cpu: $(CPU_VENV)/.scale

$(CPU_VENV)/.scale: requirements/scale.txt
	$(MAKE) --no-print-directory setup VENV=$(CPU_VENV) TORCH_SPEC="$(CPU_TORCH_SPEC)"
	@echo "[scale] installing requirements/scale.txt into $(CPU_VENV) with --no-deps: torchrec 1.9.2, fbgemm-gpu-cpu 1.8.0, ... (~40 MB, ~20 s)"
	@$(CPU_VENV)/bin/python -m pip --disable-pip-version-check install --no-deps -r requirements/scale.txt --progress-bar off 2>&1 | $(RESULT_LINES)
	@touch $@

# The install paths a user takes (wheel, [mind] extra, plain pip install .), in fresh venvs (CI; needs $(CPU_VENV)).
check-install:
	bash .ci/check_install.sh

bench: setup
	$(BIN)/python -m pytest bench/ --benchmark-only --benchmark-json=bench/results/routing_cpu.json -q
	$(BIN)/python bench/report.py bench/results/routing_cpu.json

clean:
	rm -rf build dist *.egg-info mind_kernels/_C*.so mind_kernels/_build_info.json
