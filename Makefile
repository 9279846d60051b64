# Two entry points: `make demo` (train + evaluate a CapsNet on MNIST, write figures)
# and `make test` (lint, then the whole test suite). Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build; on a CUDA machine use e.g. `make TORCH=torch demo`.
TORCH ?= torch==2.13.0

.PHONY: demo test install clean

$(BIN)/capsnet: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/capsnet

demo: install
	$(BIN)/capsnet train --config configs/mnist.py:demo --out runs/demo --download --resume

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
