"""Train the CPU base model of the word-ordering recipe: a tokenizer and a small Llama-style
causal LM built from a config here, then plain SFT on the task's prompts so that it can
produce the format. Takes longer than a demo should, so its output is committed
(``recipes/word_ordering/base_model/``, safetensors + tokenizer, < 10 MB) and
``make lm-demo`` starts from it.

    python recipes/word_ordering/train_base_model.py --overwrite        # what produced base_model/
    python recipes/word_ordering/train_base_model.py --limit 64 --epochs 1 --out /tmp/base --overwrite

Only the ``sft`` split is used (its sentences are disjoint from train / calibration / test),
with ``--copies`` different shuffles of each sentence. The SFT itself is
``SDMTrainer(use_sdm_loss=False)``: plain cross-entropy on the completion tokens (positives
only: there is nothing to mask). A GPU user replaces this model by any
``AutoModelForCausalLM`` name or path (``--base-model`` of the experiment script).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import word_order_data as wod  # noqa: E402

from sdm_hf.lm import SDMTrainer, SDMTrainingArguments  # noqa: E402
from sdm_hf.lm.generation import generate_greedy  # noqa: E402
from sdm_hf.utils.output_dir import prepare_output_dir, seal_output_dir  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "base_model")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--epochs", type=float, default=6)
    p.add_argument("--copies", type=int, default=4, help="shuffles of each SFT sentence")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--limit", type=int, default=None, help="use at most this many SFT sentences (smoke runs)")
    p.add_argument("--eval-size", type=int, default=200, help="calibration prompts to measure the base model on")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with a chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    # the end-of-turn token is the EOS, as in chat models: greedy generation stops there
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, args) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def generation_accuracy(model, tokenizer, dataset, batch_size: int = 32) -> dict:
    """Greedy generations on ``dataset``: sentence accuracy and exact match."""
    generations = generate_greedy(model, tokenizer, list(dataset["prompt"]), max_new_tokens=64, batch_size=batch_size)
    sentence, exact = wod.score_generations(generations, dataset)
    return {
        "n": len(generations),
        "sentence_accuracy": sum(sentence) / max(len(sentence), 1),
        "exact_match": sum(exact) / max(len(exact), 1),
        "examples": [{"prompt": p[-1]["content"], "generation": g} for p, g in zip(dataset["prompt"][:3], generations)],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    out = prepare_output_dir(args.out, args.overwrite, program="train_base_model.py")
    started = time.perf_counter()
    splits, summary = wod.build_splits(seed=args.seed)
    sft = splits["sft"]
    if args.limit is not None:
        sft = sft.select(range(min(args.limit, len(sft))))
    # the tokenizer sees the sentences of sft/train/calibration and the prompt template (not the test sets)
    texts = [s for name in ("sft", "train", "calibration") for s in splits[name]["sentence"]]
    texts += [p[-1]["content"] for p in splits["sft"]["prompt"][:200]]
    texts += [c[-1]["content"] for c in splits["sft"]["chosen"][:200] + splits["sft"]["rejected"][:200]]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    model = build_model(tokenizer, args)
    rows = wod.sft_rows(sft, args.copies, args.seed)
    train_args = SDMTrainingArguments(
        output_dir=str(out / "_trainer"),
        use_sdm_loss=False,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=100,
        weight_decay=0.01,
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
    )
    trainer = SDMTrainer(model=model, args=train_args, train_dataset=rows, processing_class=tokenizer)
    result = trainer.train()
    model = trainer.model.eval()
    evaluation = generation_accuracy(model, tokenizer, splits["calibration"].select(range(args.eval_size)))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    report = {
        "command": "python recipes/word_ordering/train_base_model.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: getattr(args, k) for k in ("vocab_size", "hidden", "layers", "heads", "intermediate")},
        "sft_rows": len(rows),
        "sft_sentences": len(sft),
        "epochs": args.epochs,
        "train_runtime_seconds": result.metrics["train_runtime"],
        "final_train_loss": result.metrics.get("train_loss"),
        "total_seconds": time.perf_counter() - started,
        "calibration_generation": evaluation,
        "folder_bytes": size,
        "data": summary,
        "torch": torch.__version__,
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    seal_output_dir(out, "train_base_model.py")  # a later --overwrite refuses files added by hand
    print(json.dumps({k: v for k, v in report.items() if k != "data"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
