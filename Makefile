# openseer: `make demo` and `make test` work on a fresh machine (they set up .venv first).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.openseer-installed
DEMO ?= runs/demo

.PHONY: setup data demo test test-heavy lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

data:
	@bash scripts/get-fashion-mnist.sh

# Pretrain tiny-cpu on Fashion-MNIST (labels unused) for DEMO_MINUTES, in eager mode (a fresh machine's
# first torch.compile would take about 2 of those minutes for a ~10% faster step), then the
# frozen-feature protocols at stages 3+4 against raw pixels and random init, then the few-label rows
# (100 labels chosen by select's rule against 100 random ones, and raw pixels with 100 random, each
# fitted as `openseer finetune` would, on the cached features), a report and a summary.
# The full evaluation (every k, fine-tunes, supervised from scratch) is `openseer eval RUN`.
# DEMO_PRETRAIN/DEMO_EVAL_ARGS/DEMO_REPORT_ARGS add arguments (tests/test_demo.py runs a small subset).
DEMO_MINUTES ?= 5
DEMO_EVAL ?= --layer s3+s4 --k 20 --lowshot-protocols linear --label-budget 100 --label-draws 3
DEMO_PRETRAIN ?=
DEMO_EVAL_ARGS ?=
DEMO_REPORT_ARGS ?=
demo: setup data
	rm -rf $(DEMO)
	$(VENV)/bin/openseer pretrain --data fashion-mnist --recipe tiny-cpu --out $(DEMO) optim.minutes=$(DEMO_MINUTES) optim.epochs=1000 model.compile=false $(DEMO_PRETRAIN)
	$(VENV)/bin/openseer eval $(DEMO) --data fashion-mnist $(DEMO_EVAL) --out $(DEMO)/eval.json $(DEMO_EVAL_ARGS)
	$(VENV)/bin/openseer report $(DEMO) --summary $(DEMO_REPORT_ARGS)

# `make test`: every check but the few minutes-long ones (marked heavy), within 6 minutes on 2 cores
# with setup; `make test-heavy` runs those (torch.compile, the auto path, SIGKILL anywhere, the bench
# smokes); .ci/run runs both. The tests run torch on one thread each (tests/conftest.py), so two
# pytest-xdist workers use both cores; --dist loadscope keeps a module's shared fixtures (a torchrun
# launch, a trained run) in one worker. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup data
	$(PY) -m pytest -q -x --durations=25 -m "not heavy" $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadscope)

test-heavy: setup data
	$(PY) -m pytest -q -x --durations=10 -m heavy

lint: setup
	$(VENV)/bin/ruff check openseer tests bench examples

bench: setup data
	$(PY) bench/pretrain_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
