# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup test test-all demo demo-train lint format clean gpu-check gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[serve,dev]'
	@touch $(STAMP)

# pytest exits 5 when it collects no test: not a failure of the code.
test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu"; rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-all: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/longvita demo

# Train the demo model again through the four stages (15-30 minutes on 2 CPU cores), evaluate
# it (V-NIAH, short context) and install it as the package's demo model.
demo-train: setup
	$(BIN)/longvita demo train --out runs/demo --install

# On a machine with a GPU (README, "GPU check"): every test marked gpu, then the GPU figures of
# issues 10, 12 and 14 (benchmarks/gpu_check.py: parts with time limits, ~9 min in all), one
# JSON summary. It runs that machine's python3 and torch; wheels that image lacks (PyAV, the
# server's packages) are carried in .whl/, made here by `make gpu-wheels`.
GPU_SITE := /tmp/longvita-site
gpu-check:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		python3 -m pip install -q --no-index --no-deps --no-compile --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(CURDIR):$(GPU_SITE) PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py \
		--out "$${OUT:-gpu_check_output}"

# PyAV, and the server's packages with their dependencies (for the serve part and the server
# tests), for that machine's python 3.12: about 41 MB, under the device tool's 64 MiB carry.
gpu-wheels: setup
	$(BIN)/python -m pip download -q --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl av==18.1.0 fastapi uvicorn openai

lint: setup
	$(BIN)/ruff check longvita tests benchmarks
	$(BIN)/ruff format --check longvita tests benchmarks

format: setup
	$(BIN)/ruff format longvita tests benchmarks
	$(BIN)/ruff check --fix longvita tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
