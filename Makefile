# openseer: `make demo` and `make test` work on a fresh machine (they set up .venv first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.openseer-installed
DEMO ?= runs/demo

.PHONY: setup data demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

data:
	@bash scripts/get-fashion-mnist.sh

# Pretrain the tiny-cpu recipe on Fashion-MNIST (labels unused), evaluate it, write a report.
demo: setup data
	rm -rf $(DEMO)
	$(VENV)/bin/openseer pretrain --data fashion-mnist --recipe tiny-cpu --out $(DEMO)
	$(VENV)/bin/openseer eval $(DEMO) --data fashion-mnist --out $(DEMO)/eval.json
	$(VENV)/bin/openseer report $(DEMO)
	@echo "demo run: $(DEMO) (config.yaml, metrics.jsonl, checkpoints/, eval.json, eval.md)"

test: setup data
	$(PY) -m pytest -q -x --durations=15

lint: setup
	$(VENV)/bin/ruff check openseer tests bench

bench: setup data
	$(PY) bench/pretrain_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
