# Quick start: `make demo` (whole flow, offline, on the bundled sample corpus) and `make test`.
# Both create .venv and install the project on first use; later runs reuse it until pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TINY   := artifacts/models/tiny-ko

export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= true

.PHONY: demo test test-fast bench install clean-cache server

# A local Prefect server with its UI at http://127.0.0.1:4200 (SQLite under ~/.prefect by default; for
# Postgres export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://user:pass@host:5432/prefect).
server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1 --port 4200

install: $(STAMP)

# torch first, pinned: here that takes the CPU build from local disk; unpinned it would pull CUDA wheels.
$(STAMP): pyproject.toml setup.py tasks/_shingle.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cpt init-tiny-model $(TINY) --corpus samples/medical_ko.jsonl
	$(BIN)/cpt run --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The inner loop: everything but what starts a server, a flow or a child process (CI runs `make test`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m bench.chunk_throughput

clean-cache:
	rm -rf artifacts/cache artifacts/runs
