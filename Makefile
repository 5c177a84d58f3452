# The two commands of a fresh machine: `make demo` (the main job) and `make test` (CI's command).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck compat unit integration bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/switchboard demo

test: lint typecheck compat
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	$(BIN)/mypy

compat: $(VENV)/.installed
	$(BIN)/python -m schemas.compat

unit: $(VENV)/.installed
	$(BIN)/pytest -q -m "not integration"

integration: $(VENV)/.installed
	$(BIN)/pytest -q -m integration

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .hypothesis
