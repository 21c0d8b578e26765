"""Which Gemma 3 270M layer to pool for fact checking? Chosen on training/calibration data only.

    python benchmarks/gemma_layer_choice.py

One forward pass (``output_hidden_states=True``) over the fact-checking training and
calibration statements (never the test sets); for each layer, ``concat(mean, final token)``
features, a linear probe trained on the training topics (cities, elements, facts) and its
accuracy on the calibration topics (inventions, companies, animals: other topics, so this
measures whether the layer's truth signal transfers). Results: benchmarks/results/gemma_layer_choice.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "recipes"))
import feature_sets  # noqa: E402

from sdm_hf.features.pooling import pool_hidden_states  # noqa: E402
from sdm_hf.features.settings import model_body  # noqa: E402
from sdm_hf.training.baselines import fit_linear_probe  # noqa: E402


@torch.no_grad()
def all_layers(model, tokenizer, texts, batch_size=64):
    body = model_body(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_layer = None
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], padding=True, return_tensors="pt")
        if tokenizer.pad_token_id is None:
            enc["input_ids"][enc["attention_mask"] == 0] = pad
        positions = (enc["attention_mask"].cumsum(1) - 1).clamp(min=0)
        out = body(**enc, position_ids=positions, output_hidden_states=True)
        pooled = [pool_hidden_states(h, enc["attention_mask"], "mean_last") for h in out.hidden_states]
        per_layer = [[p] for p in pooled] if per_layer is None else [a + [p] for a, p in zip(per_layer, pooled)]
    return [torch.cat(chunks) for chunks in per_layer]


def main() -> int:
    started = time.perf_counter()
    splits = feature_sets.factcheck_splits(seed=0)
    model, tokenizer = feature_sets.gemma_model()
    xs = {name: all_layers(model, tokenizer, splits[name]["document"][:]) for name in ("train", "calibration")}
    ys = {name: torch.tensor(splits[name]["label"][:]) for name in ("train", "calibration")}
    lines = [
        "# Gemma 3 270M: linear-probe accuracy per layer (train topics -> calibration topics)\n",
        "| layer | calibration accuracy |",
        "|---|---|",
    ]
    for layer in range(len(xs["train"])):
        x_tr, x_ca = xs["train"][layer], xs["calibration"][layer]
        mu, sd = x_tr.mean(), x_tr.std()
        probe = fit_linear_probe((x_tr - mu) / sd, ys["train"], num_classes=2, seed=0)
        acc = float((probe((x_ca - mu) / sd).argmax(1) == ys["calibration"]).float().mean())
        lines.append(f"| {layer} | {acc:.3f} |")
        print(lines[-1], flush=True)
    lines.append(
        f"\nLayer 0 = embeddings; {len(xs['train']) - 1} = final (after the final norm). "
        f"{time.perf_counter() - started:.0f} s on 2 CPU cores."
    )
    out = HERE / "results" / "gemma_layer_choice.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
