"""SDMTrainer epoch time vs the same Trainer with plain cross-entropy (issue: SDM LMs).

    python benchmarks/run_lm.py            # writes benchmarks/results/lm.md and lm.json

Setting (fixed, documented in the output): a 4-layer, 256-wide Llama-style causal LM built
from a config, the BPE tokenizer of tests/helpers.py (trained here on the Harvard
sentences), 2,000 paired preference examples built from the SAPLMA statements ("Repeat: s"
-> s, the negative with its last three words reversed), batch 16, one epoch each of:
plain CE (use_sdm_loss=False), SDM loss without generation, SDM loss with hard negatives
(gamma_gen = 0.5 from epoch 0), the verification head at its defaults (M = 1000,
head_procedure="auto": at most 100 epochs at lr 1e-3, early-stopped on held-out rows). Times
come from the Trainer's own train_runtime plus the head refresh, which runs at epoch start
(and once at construction for epoch 0), so it is timed separately.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "recipes"))

import saplma_data  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from sdm_hf.lm import SDMTrainer, SDMTrainingArguments  # noqa: E402
from tests.helpers import tiny_tokenizer  # noqa: E402


def data(n=2000):
    topics = saplma_data.TRAIN_TOPICS + saplma_data.CALIBRATION_TOPICS
    statements = list(saplma_data.load_topics(topics)["document"])[:n]
    rows = []
    for s in statements:
        words = s.split()
        wrong = " ".join(words[:-3] + list(reversed(words[-3:])))
        rows.append({"prompt": f"Repeat: {s}", "chosen": s, "rejected": wrong if wrong != s else s + " s"})
    return Dataset.from_list(rows)


def model_for(tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def run(name, train, **changes):
    tokenizer = tiny_tokenizer()
    args = SDMTrainingArguments(
        output_dir=f"/tmp/sdm_lm_bench/{name}",
        num_train_epochs=1,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **changes,
    )
    started = time.perf_counter()
    trainer = SDMTrainer(model=model_for(tokenizer), args=args, train_dataset=train, processing_class=tokenizer)
    setup = time.perf_counter() - started  # tokenization + epoch-0 head refresh (SDM runs)
    out = trainer.train()
    total = time.perf_counter() - started
    tokens = sum(len(r["input_ids"]) for r in trainer.train_dataset.rows)
    return {
        "name": name,
        "setup_seconds": setup,
        "train_runtime": out.metrics["train_runtime"],
        "total_seconds": total,
        "tokens": tokens,
        "generated": trainer.epoch_log[0]["generated"],
        "head_features_seconds": trainer.epoch_log[0]["head_features_seconds"],
        "head_fit_seconds": trainer.epoch_log[0]["head_fit_seconds"],
        "generation_seconds": trainer.epoch_log[0]["generation_seconds"],
    }


def main() -> int:
    train = data()
    # cross-entropy runs first and last (the first run of a process is slower: warm-up), and
    # the faster of the two is the reference
    first = run("cross-entropy", train, use_sdm_loss=False)
    results = [
        run("sdm", train, gamma_gen=0.0),
        run("sdm+hard-negatives", train, gamma_gen=0.5, hard_negatives_from_epoch=0, max_new_tokens=24),
    ]
    last = run("cross-entropy", train, use_sdm_loss=False)
    results.insert(0, min(first, last, key=lambda r: r["total_seconds"]))
    results[0]["cross_entropy_totals"] = [first["total_seconds"], last["total_seconds"]]
    base = results[0]["total_seconds"]
    lines = [
        "# SDMTrainer vs plain cross-entropy (1 epoch)",
        "",
        "4-layer 256-wide Llama-style LM (config-built), BPE tokenizer (400 tokens), 2,000 paired examples, "
        "batch 16, 2 CPU cores; verification head at its defaults (M = 1000, head_procedure='auto').",
        "",
        "| run | setup (tokenize + epoch-0 refresh) | of which head features | head fit | generation | "
        "Trainer train_runtime | total | ratio vs CE | tokens/epoch | generated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['setup_seconds']:.1f} s | {r['head_features_seconds']:.1f} s | "
            f"{r['head_fit_seconds']:.1f} s | {r['generation_seconds']:.1f} s | {r['train_runtime']:.1f} s | "
            f"{r['total_seconds']:.1f} s | {r['total_seconds'] / base:.2f}x | {r['tokens']:,} | {r['generated']} |"
        )
    lines += [
        "",
        f"Cross-entropy ran first and last ({first['total_seconds']:.1f} s / {last['total_seconds']:.1f} s); "
        "the faster is the reference. The refresh columns are the epoch-0 refresh, which every "
        "later epoch repeats (the training-time head is refitted at every epoch start).",
    ]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lm.md").write_text("\n".join(lines) + "\n")
    (out / "lm.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
