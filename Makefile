# One command checks everything: `make test`. `make demo` runs the main job on generated data on a CPU.
# Both create the virtual environment they need in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint typecheck format bench-ablation bench-daemon bench-web clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ciss demo

test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m mypy

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench-ablation: $(STAMP)
	$(PY) -m engine.experiment ablation --out bench-out/ablation

bench-daemon: $(STAMP)
	$(PY) -m benchmarks.daemon all --out bench-out/daemon

bench-web: $(STAMP)
	$(PY) benchmarks/dashboard.py page-load --out bench-out/web

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-out demo-workspace
