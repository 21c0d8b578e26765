# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo lm-demo lm-seeds lm-gemma-check lm-gpu test wheel-check lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, from the machine's local CPU wheel, so nothing pulls a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev,lm,llm,plots,demo,evaluate]"
	touch $(STAMP)

setup: $(STAMP)

# the main job on shipped data and real models (fact checking over the Mixtral attributes and
# Gemma 3 270M, sentiment over MiniLM); --overwrite so that it can be run again. Features and the
# de-quantised Gemma are cached (~/.cache/huggingface/sdm_hf, or $SDM_HF_CACHE): a re-run skips them.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 SDM_HF_VERBOSITY=$${SDM_HF_VERBOSITY:-info} $(PY) recipes/demo.py --overwrite

# the SDM language-model experiment (word ordering), one seed, reduced to < 20 min on 2 CPU cores;
# it rewrites recipes/word_ordering/results/cpu (an interrupted run continues with `make lm-seeds`'s --resume)
lm-demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/word_ordering/word_order_experiment.py --demo --seeds 0 --overwrite

# the same over 3 seeds with the paired comparison (about 50 min on 2 CPU cores; resumable: run again
# to continue, and a finished seed 0 of `make lm-demo` is reused) -> recipes/word_ordering/results/cpu
lm-seeds: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/word_ordering/word_order_experiment.py --demo --seeds 0 1 2 --resume

# the word-ordering path over the real Gemma 3 270M on CPU at toy scale (LoRA r=4, 2 optimizer steps,
# 16 training / 24 calibration prompts, 8 per test set): base row + SDM+FT(CM+HN) -> outputs/wo_gemma_check
lm-gemma-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/word_ordering/word_order_experiment.py --base-model gemma-3-270m \
	    --corpus reviews --prompt paper --train-size 16 --calibration-size 24 --test-size 8 --harvard-size 8 \
	    --shifted-size 8 --epochs 1 --max-steps 2 --batch-size 4 --head-epochs 5 --max-new-tokens 40 \
	    --generation-batch-size 8 --lora-rank 4 --hard-negatives-from-epoch 0 --runs base "SDM+FT(CM+HN)" \
	    --out outputs/wo_gemma_check --overwrite

# the GPU preset (Gemma 3 270M, four fine-tuning runs + base, ~10 min of one H200) ->
# recipes/word_ordering/results/gemma-3-270m; run again to continue an interrupted call
lm-gpu: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) recipes/word_ordering/word_order_experiment.py --preset gpu --resume

# lint, formatting, types, then every test (the `slow` ones too; `pytest -m "not slow"` skips them)
# except the clean-venv wheel install (`wheel`, about 2 minutes), which `make wheel-check` and CI run
test: $(STAMP)
	$(PY) -m ruff check sdm_hf tests benchmarks recipes examples
	$(PY) -m ruff format --check sdm_hf tests benchmarks recipes examples
	$(PY) -m mypy
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not wheel"

# the built wheel: its files and metadata, then a clean venv (torch's CPU wheel, the wheel, the rest
# from the package index) running the README's first example; ~2 minutes on 2 cores with pip's cache warm
wheel-check: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q tests/test_packaging.py

# the benchmark suite in one command (~25 min on 2 cores): benchmarks/results/bench.md
bench: $(STAMP)
	$(PY) benchmarks/run_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
