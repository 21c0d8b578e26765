"""Builders for the LM tests (no downloads): a tiny BPE tokenizer, tiny causal LMs, the
preference data and the training arguments. Every call returns a new object."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
HARVARD = ROOT / "data" / "harvard_sentences.txt"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def harvard_sentences(n: int = 48) -> list[str]:
    """The first ``n`` non-empty Harvard sentences."""
    return [line for line in HARVARD.read_text().splitlines() if line.strip()][:n]


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the Harvard sentences plus the control strings."""
    lines = [line.strip() for line in HARVARD.read_text().splitlines() if line.strip()]
    lines += ["<verified>Yes</verified>", "<verified>No</verified>"] * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.train_from_iterator(
        lines,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_causal_lm(tokenizer, seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A randomly initialised 16-wide Llama for ``tokenizer``; ``config_overrides`` replace
    LlamaConfig fields (e.g. ``num_hidden_layers=3``)."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(LlamaConfig(**{**fields, **config_overrides})).eval()


def preference(sentences):
    """Paired preference rows: "Repeat: s" -> s, the negative with its words reversed."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": f"Repeat: {s}", "chosen": s, "rejected": " ".join(reversed(s.split()))} for s in sentences]
    )


def make_args(tmp_path, **changes):
    """Small, CPU-only, quiet ``SDMTrainingArguments`` writing under ``tmp_path / "out"``."""
    from sdm_hf.lm import SDMTrainingArguments

    values = dict(
        output_dir=str(Path(tmp_path) / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        head_epochs=3,
        head_exemplar_dim=16,
        head_learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_new_tokens=6,
        seed=0,
        disable_tqdm=True,
    )
    values.update(changes)
    return SDMTrainingArguments(**values)
