# The two commands README.md gives. Each creates .venv/ on first use and reinstalls when
# pyproject.toml changes; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.assay-installed

.PHONY: quickstart test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

## quickstart: the main job on the bundled easy-vqa example (runs/quickstart/)
quickstart: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/quickstart.sh

## test: the test suite (slow and GPU tests are kept out; `make test ARGS="-m slow"` runs them)
test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/curation_vs_polars.py

clean:
	rm -rf runs/quickstart
