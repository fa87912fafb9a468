# `make demo` and `make test` set up .venv on first use (torch pinned by constraints.txt) and run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/sdrt: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[export,onnxruntime,dev]"
	touch $@

demo: $(BIN)/sdrt
	$(BIN)/sdrt demo

test: $(BIN)/sdrt
	$(BIN)/python -m pytest -q

.PHONY: demo test
