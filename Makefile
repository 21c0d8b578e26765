# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the machine's local CPU wheel, so nothing pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,plots]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) recipes/saplma_attributes.py

test: $(STAMP)
	$(PY) -m ruff check sdm_hf tests benchmarks recipes
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
