"""GRPO with an SDM verification reward, on CPU in about a minute.

    pip install ".[trl]"        # sdm-hf with TRL (in a checkout)
    python examples/grpo_with_sdm_reward.py

The policy and the verifier start from the tiny word-ordering language model committed in
``recipes/word_ordering/base_model`` (2M parameters, trained here on CPU; see that folder's
README). The task: complete a sentence by reordering its last three words. Steps:

1. a verification head: :func:`sdm_hf.lm.verification_features` of 400 calibration prompts
   with their correct completion (``<verified>Yes``) and a wrong ordering (``No``), and
   :func:`sdm_hf.fit_sdm_head` over them;
2. :class:`sdm_hf.integrations.trl.SDMVerificationReward` turns the verifier into a TRL reward: the SDM
   probability that a completion is right, shrunk towards 0.5 for completions unlike the
   calibration data (and 0 for out-of-distribution ones);
3. TRL's ``GRPOTrainer`` trains the policy for a few steps with it; TRL logs the mean reward
   and the reward logs ``sdm/hr_verified`` (completions verified inside the high-reliability
   region) and ``sdm/ood``.

A smoke-scale run (a few steps): it shows the plumbing, not a learning curve.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes" / "word_ordering"))
import word_order_data as wod  # noqa: E402

from sdm_hf import SDMConfig, fit_sdm_head  # noqa: E402
from sdm_hf.integrations.trl import SDMVerificationReward  # noqa: E402
from sdm_hf.lm import verification_features  # noqa: E402

BASE_MODEL = ROOT / "recipes" / "word_ordering" / "base_model"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="GRPO steps")
    parser.add_argument("--output", default="grpo-sdm-reward", help="GRPOTrainer's output_dir")
    args = parser.parse_args(argv)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL)
    verifier = AutoModelForCausalLM.from_pretrained(BASE_MODEL)
    splits, _ = wod.build_splits(seed=0)

    # 1. the verification head: right (Yes) and wrong (No) completions of calibration prompts
    rows = splits["calibration"].select(range(400))
    prompts = list(rows["prompt"]) * 2
    completions = [m[-1]["content"] for m in rows["chosen"]] + [m[-1]["content"] for m in rows["rejected"]]
    labels = torch.tensor([1] * len(rows) + [0] * len(rows))
    features = verification_features(verifier, tokenizer, prompts, completions)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, calib = order[: len(order) // 2], order[len(order) // 2 :]
    config = SDMConfig(
        input_dim=features.shape[1], alpha=0.9, id2label={0: "No", 1: "Yes"}, feature_pooling="verification"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty region at this scale is reported below, not warned twice
        head = fit_sdm_head(features[train], labels[train], features[calib], labels[calib], config, progress=False)
    print(head.calibration_report(alphas=(0.8, 0.9)))

    # 2. the reward, 3. GRPO
    reward = SDMVerificationReward(verifier, tokenizer, head)
    policy = AutoModelForCausalLM.from_pretrained(BASE_MODEL)
    train_prompts = Dataset.from_dict({"prompt": list(splits["train"].select(range(64))["prompt"])})
    config = GRPOConfig(
        output_dir=args.output,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=40,
        max_steps=args.steps,
        logging_steps=1,
        learning_rate=1e-5,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=policy, reward_funcs=[reward], args=config, train_dataset=train_prompts, processing_class=tokenizer
    )
    trainer.train()
    print("\nstep | mean SDM reward | verified in the HR region | out of distribution")
    for entry in (e for e in trainer.state.log_history if "reward" in e):
        print(
            f"{entry['step']:4d} | {entry['rewards/sdm_verification_probability/mean']:.3f} | "
            f"{entry['sdm/hr_verified']:.3f} | {entry['sdm/ood']:.3f}"
        )
    print(f"\n{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
