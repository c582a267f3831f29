# Set-up and everyday commands. Each target installs what it needs into .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of this exact version is served locally; an unpinned torch pulls GBs of CUDA packages.
TORCH  := torch==2.13.0

.PHONY: serve test lint bench clean

serve: $(VENV)/.serve  ## serve models/ (the bundled demo) on http://127.0.0.1:8000
	$(BIN)/gruserve serve --models-dir models

test: $(VENV)/.test  ## run the whole test suite
	$(BIN)/python -m pytest

lint: $(VENV)/.test  ## ruff (rules and format) and mypy, as tests/test_static_checks.py runs them
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy service/gruserve tests bench

bench: $(VENV)/.test
	$(BIN)/python -m bench.run_all

$(VENV)/.serve: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[grpc]'
	touch $@

$(VENV)/.test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.serve

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
