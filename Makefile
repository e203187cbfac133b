# `make demo` and `make test` set everything up on a fresh machine (a .venv beside this file).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# Keeps a torch that is already installed (Kaggle's, a CUDA build on the server): pip only adds what is missing.
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m dcal_lib demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check dcal_lib tests scripts notebooks

clean:
	rm -rf runs/demo build .pytest_cache
