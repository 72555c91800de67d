# The few commands a newcomer needs. `make test` is the one CI runs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up reset test faults lint typecheck bench bench-api search clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Install into .venv (if needed), migrate the embedded SQLite database, and run the API on
## http://127.0.0.1:8000 with one Celery worker (SQL broker, no Redis needed). Ctrl-C stops both.
up: $(STAMP)
	$(BIN)/python -m service.run

## Install into .venv (if needed), lint, type-check and run the whole test suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

## The fault suite, each scenario repeated REPEATS times with its own random timing (about 12 minutes at 5):
## workers killed, Redis and PostgreSQL restarted (PostgreSQL with pg_ctlcluster: root), a full disk (a
## tmpfs: root). Prints the summary table of docs/reliability.md. `make test` runs each scenario once.
REPEATS ?= 5
faults: $(STAMP)
	$(BIN)/pytest -q -m faults --fault-repeats $(REPEATS) tests/service/test_faults.py

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## The search-step benchmark (writes nothing; paste its table into docs/benchmarks.md).
bench: $(STAMP)
	$(BIN)/python bench/search_step.py

## The API under load: POST /jobs, metrics GETs and many SSE streams against one uvicorn process on its own
## PostgreSQL database and Redis queue (about 2 minutes; paste its tables into docs/benchmarks.md).
bench-api: $(STAMP)
	$(BIN)/python bench/api_load.py

## A small example search on PTB from the command line: make search OUT=runs/ptb
OUT ?= runs/example
search: $(STAMP)
	$(BIN)/python -m worker.search run examples/ptb_small.json --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

## Remove the embedded database, broker and artifacts (./var).
reset:
	rm -rf var
