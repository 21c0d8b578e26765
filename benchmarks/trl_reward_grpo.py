"""SDMVerificationReward inside TRL's GRPOTrainer, on CPU at toy scale: does the call contract hold
in a real online-training loop, and what does the reward curve look like?

    python benchmarks/trl_reward_grpo.py    # writes benchmarks/results/trl_reward_grpo.{md,json}

Setting (fixed): the verifier is the tiny SDM LM of tests/helpers.py (a config-built
Llama, a verification head fitted on 60 "Repeat: s" documents); the policy is another
config-built Llama with the same tokenizer, trained by GRPO for a few steps on 16 "Repeat: s"
prompts (4 generations each, 12 new tokens). Both models are untrained, so the reward is near
its floor: this is a smoke run of the plumbing (rewards reach GRPO, its logs carry the SDM
metrics), not evidence that GRPO learns from SDM rewards.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from datasets import Dataset
    from run_core import machine
    from trl import GRPOConfig, GRPOTrainer

    from sdm_hf.integrations.trl import SDMVerificationReward
    from tests.helpers import build_lm_repo, harvard_sentences, tiny_causal_lm, tiny_tokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        repo, _, _ = build_lm_repo(Path(tmp))
        reward = SDMVerificationReward.from_pretrained(repo, batch_size=16)
        tokenizer = tiny_tokenizer()
        prompts = Dataset.from_list([{"prompt": f"Repeat: {s}"} for s in harvard_sentences(16)])
        args = GRPOConfig(
            output_dir=str(Path(tmp) / "grpo"),
            per_device_train_batch_size=8,
            num_generations=4,
            max_completion_length=12,
            max_steps=6,
            learning_rate=1e-4,
            logging_steps=1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOTrainer(
            model=tiny_causal_lm(tokenizer),
            reward_funcs=[reward],
            args=args,
            train_dataset=prompts,
            processing_class=tokenizer,
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    steps = [e for e in trainer.state.log_history if "reward" in e]
    keys = sorted({k for e in steps for k in e if "sdm" in k or k.startswith("reward")})
    lines = [
        "# SDMVerificationReward in TRL's GRPOTrainer (CPU, toy scale)",
        "",
        f"{machine()}. Verifier: the tiny SDM LM of tests/helpers.py; policy: a config-built "
        "Llama; 16 prompts, 4 generations each, 12 new tokens, 6 steps. Both models are untrained: this "
        "checks the plumbing, it is not a learning curve.",
        "",
        "| step | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for e in steps:
        lines.append(f"| {e.get('step')} | " + " | ".join(f"{e.get(k, float('nan')):.4f}" for k in keys) + " |")
    lines += ["", f"Training took {seconds:.1f} s."]
    out = ROOT / "benchmarks" / "results"
    (out / "trl_reward_grpo.md").write_text("\n".join(lines) + "\n")
    (out / "trl_reward_grpo.json").write_text(json.dumps({"seconds": seconds, "steps": steps}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
