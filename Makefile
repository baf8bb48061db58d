# Grove: `make run` starts the embedded service, `make test` runs the suite.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PORT ?= 8000
# pytest-xdist workers for `make test`, each with its own PostgreSQL, Redis and live stacks; whole test files go to
# one worker (--dist loadfile). Most of the suite waits on processes (leases, training steps of other processes),
# so two workers on two cores run it 1.7x faster (docs/BENCHMARKS.md, Test suite). 0 runs it in this one process.
TEST_WORKERS ?= 2
# The install is redone only when the lock or the project metadata change.
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)

.PHONY: install migrate models test-models run test lint format bench bench-walkthrough bench-pagination bench-load bench-load-ab bench-export bench-eval bench-reference bench-ecosystem bench-sweep bench-train bench-dpo bench-limits bench-polling bench-precision gpu-check chaos fuzz clean

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

# One tiny random model per decoder family the ONNX builder supports (a few seconds each, one tokenizer load).
TEST_MODELS := tiny-llama-test tiny-mistral-test tiny-qwen2-test tiny-qwen3-test tiny-phi3-test tiny-gemma-test \
	tiny-gemma2-test tiny-gemma3-test

test-models: install
	$(PY) -m worker.prepare_models --only $(TEST_MODELS)

run: install migrate models
	PORT=$(PORT) scripts/run-embedded

test: install test-models
	@m="$$({ command -v chromium || command -v chromium-browser; } >/dev/null || echo ' chromium')$$({ docker compose version || docker-compose version; } >/dev/null 2>&1 || echo ' docker-compose')$$({ command -v c++ || command -v g++; } >/dev/null || echo ' g++')"; [ -z "$$m" ] || echo "optional tools missing (their tests will be skipped):$$m"
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# ruff, and the layering contracts of pyproject.toml's [tool.importlinter] (jobs/ below api/ and worker/).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: bench-walkthrough

# Wall time of the README walk-through (smollm2-135m-instruct, 300 rows), for docs/BENCHMARKS.md.
bench-walkthrough: install migrate models
	bench/walkthrough.sh

# Olive 0.13 (own venv under var/bench, installed from PyPI) vs a plain Trainer + peft script vs a Grove job through
# the API: smollm2-135m-instruct, 2,000 emotion rows; writes the Training section of docs/BENCHMARKS.md (~30 min).
bench-train: install models
	flock /tmp/grove-heavy.lock $(PY) bench/train_bench.py $(BENCH_ARGS)

# DPO: SFT on 2,000 emotion rows, then DPO from that adapter with Grove and with TRL's DPOTrainer on the same
# pairs; reward and label accuracy before and after; writes the DPO section of docs/BENCHMARKS.md. Long on a
# CPU (fp32 there; a smoke run: BENCH_ARGS="--model tiny-llama-test --rows 16 --no-write").
# What mixed_precision auto measures on this CPU (bf16 against fp32 matmuls at a model's shapes) and what it picks.
bench-precision: install
	$(PY) bench/precision_probe.py --model $(or $(MODEL),smollm2-135m-instruct)

bench-dpo: install models
	flock /tmp/grove-heavy.lock $(PY) bench/dpo_bench.py $(BENCH_ARGS)

# ONNX export of smollm2-135m-instruct + emotion adapters: export time, size, tokens/s and accuracy against
# PyTorch, adapter switching, Olive when importable (see docs/BENCHMARKS.md). One heavy run at a time.
bench-export: install models
	flock /tmp/grove-heavy.lock $(PY) bench/export_bench.py

# Evaluation jobs on smollm2-135m-instruct: 500-row emotion label task (raw and chat prompts, strict and lenient
# accuracy), batched vs one-at-a-time reference, int4 ONNX export scored streamed. One heavy run at a time.
bench-eval: install models
	flock /tmp/grove-heavy.lock $(PY) bench/eval_emotion.py

# The emotion reference task end to end (~25 min on 2 cores): a default LoRA fine-tune on all 16,000 training rows
# (loss on the label, bf16 as auto picks on a GPU), its int4 export, one evaluation job scoring base, adapter, int4.
bench-reference: install models
	flock /tmp/grove-heavy.lock $(PY) bench/eval_emotion.py --parts finetune --train-rows 16000 --completion-only --mixed-precision bf16

# Sweeps: 8-trial TPE sweep (learning_rate, r) on emotion with smollm2-135m-instruct, max_parallel 1 on one worker
# and 2 on two workers (PostgreSQL + Redis), best trial vs default settings on val.jsonl. One heavy run at a time.
bench-sweep: install models
	flock /tmp/grove-heavy.lock $(PY) bench/sweep_bench.py

# grove download vs curl + sha256sum, and SSE vs 1 s polling event latency (docs/BENCHMARKS.md, Ecosystem).
bench-ecosystem: install test-models
	flock /tmp/grove-heavy.lock $(PY) bench/ecosystem_bench.py

# GET /v1/fine_tuning/jobs?limit=20 with 100 and with 100,000 jobs in the table (needs local PostgreSQL).
bench-pagination: install
	$(PY) bench/pagination.py

# Requests/s and latency of GET and POST jobs (wrk), and a 500 MB download against nginx (same run).
bench-load: install
	$(PY) bench/load.py

# Interleaved A/B of status polling between two trees or settings: make bench-load-ab A=/tmp/old B=. [ROUNDS=4]
bench-load-ab: install test-models
	$(PY) bench/load_ab.py "$(A)" "$(B)" --rounds $(or $(ROUNDS),4)

# Status polling against a bare uvicorn + FastAPI app returning a document of the same size, interleaved turns in
# one run (bench/polling_ratio.py, its own PostgreSQL and Redis; needs wrk). Goal: >= 0.5x its req/s, p99 <= 2x.
bench-polling: install test-models
	$(PY) bench/polling_ratio.py --rounds $(or $(ROUNDS),3)

# The GPU check (docs/BENCHMARKS.md, GPU): Grove LoRA/QLoRA against the Trainer on one CUDA card, a CUDA export.
# DRY_RUN=1 runs the same code on the CPU with tiny-llama-test; on a lent GPU machine run scripts/gpu-check.sh.
gpu-check: install $(if $(DRY_RUN),test-models,models)
	$(PY) scripts/gpu-check $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_ARGS)

# Latency of status polling without and with the per-key rate limit (Redis), for docs/RELIABILITY.md (Security).
bench-limits: install
	$(PY) bench/request_limits.py

# Fault scenarios at full scale (50 jobs through a broker loss, 20 worker kills, 50 requests through an
# API kill, a database restart); CI runs the same tests at a small scale. Figures: docs/RELIABILITY.md.
chaos: install test-models
	GROVE_CHAOS_FULL=1 $(BIN)/pytest tests/chaos -s -v

# Schemathesis over every operation of the OpenAPI spec against a live API on PostgreSQL and Redis: no 5xx, no
# response outside the spec. CI runs the same test with 8 examples per operation (~30 s); this draws 1000 (~9 min).
fuzz: install test-models
	GROVE_FUZZ_MAX_EXAMPLES=$${GROVE_FUZZ_MAX_EXAMPLES:-1000} $(BIN)/pytest tests/api/test_fuzz.py -p no:cacheprovider -q

clean:
	rm -rf var/grove.db* var/broker.sqlite* var/storage var/work
