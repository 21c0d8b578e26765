"""SDM verification as a reward for TRL's online trainers (``GRPOTrainer`` and friends).

A pair (prompt, completion) is embedded as the head was fitted (:func:`~sdm_hf.lm.verification_features`)
and scored by a frozen verification head, separate from the policy: calibrated, with ``ood_reward`` for
out-of-distribution completions (q = 0). Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760;
Similarity-Distance-Magnitude Language Models, arXiv:2510.26183, §3.4. Usage: docs/language_models.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..head.config import is_verification_pooling
from ..head.inference import SDMOutput
from ..head.modeling import SDMHead
from ..lm.control import ControlTokens, Prompt, as_messages, check_messages
from ..lm.verification_features import verification_features, verification_pooling_of

__all__ = ["SDMVerificationReward", "REWARD_KINDS"]

REWARD_KINDS = ("probability", "hr")


def _content(value: Any, index: int) -> str:
    """A completion's text: a string, or the last message of a conversational completion."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bytes, dict)) or not isinstance(value, Sequence):
        raise TypeError(f"completions[{index}] must be a string or a list of messages, got {type(value).__name__}")
    return check_messages(value, f"completions[{index}]")[-1]["content"]


def _batch(values: Any, name: str) -> list:
    """``values`` as a list; a string, None or a mapping raises ``TypeError`` (a mistake, not a batch of one)."""
    if values is None or isinstance(values, (str, bytes, dict)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list (one item per completion), got {type(values).__name__}")
    return list(values)


class SDMVerificationReward:
    """A TRL reward function (one float or None per completion) from an SDM LM and its verification head.

    Args:
        model: the causal LM the head was fitted on (put in eval mode).
        tokenizer: its tokenizer (with the chat template it was trained with, if any).
        head: the calibrated document-level verification head (2 classes, 1 = "Yes").
        kind: ``"probability"``: the SDM probability of "Yes", in [0, 1]; ``"hr"``: 1.0 for a "Yes" inside
            the high-reliability region, else 0.0.
        ood_reward: reward of an out-of-distribution completion (q = 0); None gives TRL a None (left out
            of its mean).
        batch_size: completions per forward of ``model``.
        control: the control strings the model was trained with.

    Raises:
        ValueError: an unknown ``kind``, not a 2-class verification head, an uncalibrated head, or
            ``batch_size < 1``.
        TypeError: ``head`` is not an SDMHead, or ``ood_reward`` is not a finite number or None.

    Example::

        reward = SDMVerificationReward.from_pretrained("out/final")    # model + sdm_head/
        trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=GRPOConfig(...), train_dataset=prompts)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        head: SDMHead,
        kind: str = "probability",
        ood_reward: float | None = 0.0,
        batch_size: int = 8,
        control: ControlTokens | None = None,
    ):
        if kind not in REWARD_KINDS:
            raise ValueError(f"kind must be one of {REWARD_KINDS}, got {kind!r}")
        if not isinstance(head, SDMHead):
            raise TypeError(f"head must be an SDMHead, got {type(head).__name__}")
        if head.config.num_classes != 2 or not is_verification_pooling(head.config.feature_pooling):
            raise ValueError(
                "the head is not an LM verification head (2 classes, feature_pooling 'verification...'): "
                "use the head SDMTrainer.build_final_head() fitted"
            )
        if head.calibration is None:
            raise ValueError("the head is not calibrated: call head.calibrate(...) or use a head SDMTrainer saved")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if ood_reward is not None and (
            isinstance(ood_reward, bool)
            or not isinstance(ood_reward, (int, float))
            or not math.isfinite(float(ood_reward))
        ):
            raise TypeError(f"ood_reward must be a finite number or None, got {ood_reward!r}")
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head
        self.kind, self.ood_reward, self.batch_size = kind, ood_reward, int(batch_size)
        self.control = control or ControlTokens()
        self.__name__ = f"sdm_verification_{kind}"  # the name TRL logs the reward under

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> SDMVerificationReward:
        """The reward of an SDM-equipped folder or Hub repo (causal LM at the root, head in ``sdm_head/``);
        ``kwargs`` as in the constructor; a missing path raises ``FileNotFoundError``."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..repository import load_sdm_model

        model, head = load_sdm_model(path, model_class=AutoModelForCausalLM)  # explains a missing path
        return cls(model, AutoTokenizer.from_pretrained(path), head, **kwargs)

    def verify(self, prompts: Sequence[Prompt], completions: Sequence[Any]) -> SDMOutput:
        """The head's output for N (prompt, completion) pairs (N rows).

        Raises:
            TypeError / ValueError: the first prompt or completion that is not a string or a list of
                ``{"role": str, "content": str}`` messages (named), or lists of different lengths.
        """
        prompts, completions = _batch(prompts, "prompts"), _batch(completions, "completions")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        for i, prompt in enumerate(prompts):
            as_messages(prompt, f"prompts[{i}]")
        texts = [_content(c, i) for i, c in enumerate(completions)]
        cfg = self.head.config
        feats = verification_features(
            self.model,
            self.tokenizer,
            list(prompts),
            texts,
            self.control,
            batch_size=self.batch_size,
            layer=-1 if cfg.feature_layer is None else cfg.feature_layer,
            pooling=verification_pooling_of(cfg.feature_pooling),
        )
        return self.head.predict(feats)

    def rewards(self, out: SDMOutput) -> list[float | None]:
        """The rewards of a head output (see ``kind`` and ``ood_reward``)."""
        if self.kind == "probability":
            values = out.probabilities[:, 1].float()
        else:
            values = ((out.prediction == 1) & out.in_hr).float()
        rewards: list[float | None] = [float(v) for v in values.tolist()]
        for i in out.is_ood.nonzero().flatten().tolist():
            rewards[i] = None if self.ood_reward is None else float(self.ood_reward)
        return rewards

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        """One reward per completion (TRL's contract); ``log_metric``, when given, receives the share verified
        "Yes" in the HR region (``sdm/hr_verified``) and the out-of-distribution share (``sdm/ood``)."""
        if not len(_batch(completions, "completions")):
            return []
        out = self.verify(prompts, completions)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric("sdm/hr_verified", float(((out.prediction == 1) & out.in_hr).float().mean()))
            log_metric("sdm/ood", float(out.is_ood.float().mean()))
        return self.rewards(out)
