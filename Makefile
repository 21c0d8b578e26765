# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo lm-demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the machine's local CPU wheel, so nothing pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,plots,demo,evaluate]"
	touch $(STAMP)

setup: $(STAMP)

# the main job on shipped data and real models (fact checking over the Mixtral attributes and
# Gemma 3 270M, sentiment over MiniLM); --overwrite so that it can be run again. Features and the
# de-quantised Gemma are cached (~/.cache/huggingface/sdm_hf, or $SDM_HF_CACHE): a re-run skips them.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/demo.py --overwrite

# the SDM language-model experiment (word ordering), reduced to < 20 min on 2 CPU cores; it
# rewrites recipes/word_ordering/results (an interrupted run continues with --demo --resume)
lm-demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/word_ordering/word_order_experiment.py --demo --overwrite

# lint, formatting, types, then every test (the `slow` ones too; `pytest -m "not slow"` skips them)
test: $(STAMP)
	$(PY) -m ruff check sdm_hf tests benchmarks recipes
	$(PY) -m ruff format --check sdm_hf tests benchmarks recipes
	$(PY) -m mypy
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# the benchmark suite in one command (~25 min on 2 cores): benchmarks/results/bench.md
bench: $(STAMP)
	$(PY) benchmarks/run_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
