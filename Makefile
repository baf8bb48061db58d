# Grove: `make run` starts the embedded service, `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PORT ?= 8000
# The install is redone only when the lock or the project metadata change.
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)

.PHONY: install migrate models test-models run test lint format bench bench-walkthrough bench-pagination bench-load chaos clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --no-deps -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

migrate: install
	$(BIN)/alembic upgrade head

models: install
	$(PY) -m worker.prepare_models

test-models: install
	$(PY) -m worker.prepare_models --only tiny-llama-test

run: install migrate models
	PORT=$(PORT) scripts/run-embedded

test: install test-models
	$(BIN)/ruff check .
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: bench-walkthrough

# Wall time of the README walk-through (smollm2-135m-instruct, 300 rows), for docs/BENCHMARKS.md.
bench-walkthrough: install migrate models
	bench/walkthrough.sh

# GET /v1/fine_tuning/jobs?limit=20 with 100 and with 100,000 jobs in the table (needs local PostgreSQL).
bench-pagination: install
	$(PY) bench/pagination.py

# Requests/s and latency of GET and POST jobs (wrk), and a 500 MB download against nginx (same run).
bench-load: install
	$(PY) bench/load.py

# Fault scenarios at full scale (50 jobs through a broker loss, 20 worker kills, 50 requests through an
# API kill, a database restart); CI runs the same tests at a small scale. Figures: docs/RELIABILITY.md.
chaos: install test-models
	GROVE_CHAOS_FULL=1 $(BIN)/pytest tests/chaos -s -v

clean:
	rm -rf var/grove.db* var/broker.sqlite* var/storage var/work
