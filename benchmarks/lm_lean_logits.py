"""Memory-lean SDM next-token loss vs full vocabulary logits, at Gemma 3 270M's vocabulary size.

    python benchmarks/lm_lean_logits.py            # ~2 minutes on 2 CPU cores
    python benchmarks/lm_lean_logits.py --one lean  # one measurement (what the driver runs per process)

A one-layer Llama with Gemma 3's vocabulary (262,144 tokens) and hidden size (640), built from a
config (no download); a batch shaped like the word-ordering documents (``--batch`` rows of
``--length`` tokens, the last ``--supervised`` of each supervised, as a positive's completion
is). Each mode runs in its own process so its peak resident memory is its own: ``full``
computes ``[B, T, V]`` logits, ``lean`` passes ``logits_to_keep=supervised_logit_mask(labels)``
(``[N, V]`` logits). Reported: forward + loss + backward seconds per step (median of
``--steps``), supervised tokens per second, peak RSS, the logits tensor's size, and the loss of
both modes (equal). Writes ``benchmarks/results/lm_lean_logits.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from run_core import machine, peak_rss_gb  # noqa: E402  (the benchmark suite's machine line and peak RSS)

from sdm_hf.lm.loss import sdm_next_token_loss, supervised_logit_mask  # noqa: E402
from sdm_hf.lm.masks import IGNORE_INDEX  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def measure(mode: str, batch: int, length: int, supervised: int, steps: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=262_144,
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).train()
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, config.vocab_size, (batch, length), generator=g)
    labels = input_ids.clone()
    labels[:, : length - supervised] = IGNORE_INDEX
    beta = torch.full((batch,), 2.5)
    keep = {"logits_to_keep": supervised_logit_mask(labels)} if mode == "lean" else {}
    times, loss_value, logits_shape = [], None, None
    for _ in range(steps + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        logits = model(input_ids=input_ids, **keep).logits
        loss = sdm_next_token_loss(logits, labels, beta)
        loss.backward()
        times.append(time.perf_counter() - started)
        loss_value, logits_shape = float(loss), list(logits.shape)
        del logits, loss
    step = statistics.median(times[1:])
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {
        "mode": mode,
        "batch": batch,
        "length": length,
        "supervised_per_row": supervised,
        "seconds_per_step": step,
        "supervised_tokens_per_second": tokens / step,
        "peak_rss_gib": peak_rss_gb(),
        "logits_shape": logits_shape,
        "logits_gib_float32": torch.Size(logits_shape).numel() * 4 / 2**30,
        "loss": loss_value,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", choices=["full", "lean"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--supervised", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.batch, args.length, args.supervised, args.steps)))
        return 0
    rows = []
    for mode in ("full", "lean"):
        cmd = [sys.executable, __file__, "--one", mode]
        cmd += ["--batch", str(args.batch), "--length", str(args.length), "--supervised", str(args.supervised)]
        cmd += ["--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    full, lean = rows
    where = machine()
    lines = [
        "# Memory-lean SDM loss vs full vocabulary logits (vocabulary 262,144, hidden 640)",
        "",
        f"`python benchmarks/lm_lean_logits.py` on {where}. Batch {args.batch} x {args.length} tokens, "
        f"the last {args.supervised} of each "
        "row supervised; one-layer Llama built from a config; forward + loss + backward, median of "
        f"{args.steps} steps, each mode in its own process.",
        "",
        "| mode | logits | logits (float32) | s / step | supervised tokens / s | peak RSS | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['logits_shape']} | {r['logits_gib_float32']:.2f} GiB | {r['seconds_per_step']:.2f} | "
            f"{r['supervised_tokens_per_second']:.0f} | {r['peak_rss_gib']:.2f} GiB | {r['loss']:.6f} |"
        )
    lines += [
        "",
        f"Lean / full: {full['seconds_per_step'] / lean['seconds_per_step']:.1f}x faster, peak RSS "
        f"{lean['peak_rss_gib']:.2f} vs {full['peak_rss_gib']:.2f} GiB; losses differ by "
        f"{abs(full['loss'] - lean['loss']):.2e}.",
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_lean_logits.md").write_text("\n".join(lines), encoding="utf-8")
    (RESULTS / "lm_lean_logits.json").write_text(
        json.dumps({"machine": where, "settings": vars(args), "rows": rows}, indent=2) + "\n", encoding="utf-8"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
