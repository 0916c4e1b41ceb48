# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup test test-all demo lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# pytest exits 5 when it collects no test: not a failure of the code.
test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu"; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-all: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/longvita demo

lint: setup
	$(BIN)/ruff check longvita tests benchmarks
	$(BIN)/ruff format --check longvita tests benchmarks

format: setup
	$(BIN)/ruff format longvita tests benchmarks
	$(BIN)/ruff check --fix longvita tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
