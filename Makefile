# Install order matters: the pinned CPU torch goes in first, so the package's "torch>=2.5"
# requirement is already met and pip never pulls CUDA wheels. GPU users: install your torch first
# (e.g. `make install TORCH_SPEC=torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test test-all bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"

demo: install
	$(BIN)/turbos demo

# pytest exit code 5 (no tests collected) is reported as a failure, never a pass.
test: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

test-all: install
	$(BIN)/python -m pytest -q -m ""

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/prefill.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/train_tiny.py
	$(BIN)/python benchmarks/grpo_step.py

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
