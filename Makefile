# brpg-lightning: `make train` and `make test` each do all set-up on a fresh machine.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export WANDB_MODE ?= offline
export PYTHONHASHSEED ?= 0

.PHONY: install train test test-fast bench lint clean

install: $(STAMP)

# Re-runs only when the package metadata or the pins change.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

## Embedded synthetic default, end to end on the CPU (prints the final mIoU last).
train: $(STAMP)
	$(PY) -m brpg_lightning $(ARGS)

## Whole suite (slow end-to-end runs included; `make test-fast` skips them).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## Speed and memory benchmarks: ratios measured side by side in one run.
bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache bench_results
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
