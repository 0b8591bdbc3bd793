# The two commands of the README: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build CI and this machine hold locally. On a GPU machine any torch>=2.4 with CUDA works:
# make TORCH='torch>=2.4' serve
TORCH  ?= torch==2.13.0
MODEL  ?= nvidia/llama-nemotron-rerank-1b-v2
PORT   ?= 8000

.PHONY: install serve test lint format checkpoint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e ".[torch,dev]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/rankserve serve --model "$(MODEL)" --port $(PORT)

test: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: install
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

# A tiny random-weight checkpoint to serve without the real weights: make checkpoint && make serve MODEL=checkpoints/tiny
checkpoint: install
	$(BIN)/python scripts/make_test_checkpoint.py --size tiny --output checkpoints/tiny

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache
