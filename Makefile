# mplus: the two commands of the README.
#   make bench   set up (if needed) and run the benchmarks, then print the results table
#   make test    set up (if needed) and run the test suite
# Set-up creates .venv with the machine's python3, installs torch 2.13.0 (CPU build) from the local wheel directory
# only, the pinned dependencies, and builds the extension. It never downloads a CUDA build of torch.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_WHEELS ?= /opt/wheels
STAMP := $(VENV)/.mplus-deps
BUILD_STAMP := $(VENV)/.mplus-build
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu)
RESULTS ?= bench-results
PYTEST_ARGS ?=

.PHONY: setup test bench clean

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch from the local CPU wheel only (--no-index): a missing wheel is an error, never a multi-GB CUDA download
	$(PY) -m pip install -q --no-index --no-deps --find-links $(TORCH_WHEELS) torch==$(TORCH_VERSION)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) -r requirements.txt
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

bench: $(BUILD_STAMP)
	mkdir -p $(RESULTS)
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-json=$(RESULTS)/latest.json -q $(PYTEST_ARGS)
	$(PY) benchmarks/report.py $(RESULTS)/latest.json --png $(RESULTS)/speedups.png | tee $(RESULTS)/latest.md

clean:
	rm -rf build $(VENV) $(RESULTS) mplus_kernels/_C*.so *.egg-info
