# stepcache: `make test` runs the test suite; everything it needs is installed into .venv on first use.
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-fast lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict common tasks bench celeryconfig.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis

bench: install
	$(BIN)/python -m bench.bench_queue
