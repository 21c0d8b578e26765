"""sdm_hf.integrations.trl.SDMVerificationReward: TRL's reward-function contract on a tiny SDM LM."""

import dataclasses

import pytest
import torch

from sdm_hf.integrations.trl import SDMVerificationReward
from sdm_hf.lm import verification_features
from tests.helpers import build_lm_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return build_lm_repo(tmp_path_factory.mktemp("reward"))


def test_rewards_are_the_heads_verdicts_through_trls_call(repo):
    path, prompts, completions = repo
    reward = SDMVerificationReward.from_pretrained(path, batch_size=4)
    logged = {}
    # what GRPOTrainer passes: prompts, completions, completion_ids, dataset columns, state, loggers
    got = reward(
        prompts=prompts[:6],
        completions=completions[:6],
        completion_ids=[[1, 2]] * 6,
        answer=["x"] * 6,
        trainer_state=None,
        log_metric=lambda name, value: logged.__setitem__(name, value),
        log_extra=lambda *a, **k: None,
    )
    expected = reward.head.predict(verification_features(reward.model, reward.tokenizer, prompts[:6], completions[:6]))
    # the head's probability of "Yes"; an out-of-distribution completion (q = 0) earns ood_reward = 0
    want = [0.0 if ood else p for p, ood in zip(expected.probabilities[:, 1].tolist(), expected.is_ood.tolist())]
    assert got == pytest.approx(want, rel=1e-5)
    assert all(0.0 <= r <= 1.0 for r in got) and set(logged) == {"sdm/hr_verified", "sdm/ood"}
    # conversational completions (TRL's chat format) score as their text
    chat = [[{"role": "assistant", "content": c}] for c in completions[:6]]
    assert reward(prompts=prompts[:6], completions=chat) == pytest.approx(got, rel=1e-6)
    assert reward.__name__ == "sdm_verification_probability" and reward(prompts=[], completions=[]) == []


def test_hr_kind_and_out_of_distribution_rewards(repo):
    path, prompts, completions = repo
    hr = SDMVerificationReward.from_pretrained(path, kind="hr")
    out = hr.verify(prompts[:8], completions[:8])
    assert hr.rewards(out) == [float(p == 1 and h) for p, h in zip(out.prediction.tolist(), out.in_hr.tolist())]
    ood = dataclasses.replace(out, is_ood=torch.tensor([True] + [False] * 7))
    assert hr.rewards(ood)[0] == 0.0 and hr.rewards(ood)[1:] == hr.rewards(out)[1:]
    hr.ood_reward = None
    assert hr.rewards(ood)[0] is None  # TRL turns None into NaN and leaves it out of its mean


def test_bad_construction_is_explained(repo):
    path, _, _ = repo
    reward = SDMVerificationReward.from_pretrained(path)
    with pytest.raises(ValueError, match="kind must be one of"):
        SDMVerificationReward(reward.model, reward.tokenizer, reward.head, kind="judge")
    with pytest.raises(TypeError, match="head must be an SDMHead"):
        SDMVerificationReward(reward.model, reward.tokenizer, object())
    with pytest.raises(ValueError, match="got 2 prompts but 1 completions"):
        reward.verify(["a", "b"], ["c"])
    with pytest.raises(TypeError, match=r"completions\[0\] must be a string or a list of messages"):
        reward(prompts=["a"], completions=[3])
    # malformed inputs name the argument, never Python internals
    cases = [
        ({"prompts": ["a"], "completions": None}, TypeError, "completions must be a list"),
        ({"prompts": ["a"], "completions": "a completion"}, TypeError, "completions must be a list"),
        ({"prompts": None, "completions": ["x"]}, TypeError, "prompts must be a list"),
        ({"prompts": ["a"], "completions": [None]}, TypeError, r"completions\[0\] must be a string"),
        ({"prompts": [[{"content": "hi"}]], "completions": ["x"]}, ValueError, r"prompts\[0\]\[0\] needs .*'role'"),
        ({"prompts": [[{"role": "user"}]], "completions": ["x"]}, ValueError, r"prompts\[0\]\[0\] needs .*'content'"),
        ({"prompts": [[]], "completions": ["x"]}, ValueError, r"prompts\[0\] is an empty list"),
        ({"prompts": [["hi"]], "completions": ["x"]}, TypeError, r"prompts\[0\]\[0\] must be a dict"),
        ({"prompts": ["a"], "completions": [[{"role": "assistant"}]]}, ValueError, r"completions\[0\]\[0\] needs"),
    ]  # fmt: skip
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            reward(**kwargs)
    for bad in ("zero", True, float("nan")):
        with pytest.raises(TypeError, match="ood_reward must be a finite number or None"):
            SDMVerificationReward(reward.model, reward.tokenizer, reward.head, ood_reward=bad)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        SDMVerificationReward(reward.model, reward.tokenizer, reward.head, batch_size=0)


def test_the_reward_drives_a_tiny_grpo_run(repo, tmp_path):
    """TRL's own GRPOTrainer calls the reward and logs it with the SDM metrics (2 steps on CPU)."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from tests.helpers import harvard_sentences, tiny_causal_lm, tiny_tokenizer

    path, _, _ = repo
    tokenizer = tiny_tokenizer()
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "grpo"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=tiny_causal_lm(tokenizer),
        reward_funcs=[SDMVerificationReward.from_pretrained(path)],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": f"Repeat: {s}"} for s in harvard_sentences(8)]),
        processing_class=tokenizer,
    )
    trainer.train()
    logged = [e for e in trainer.state.log_history if "reward" in e]
    assert len(logged) == 2
    for entry in logged:
        assert 0.0 <= entry["rewards/sdm_verification_probability/mean"] <= 1.0
        assert 0.0 <= entry["sdm/ood"] <= 1.0 and 0.0 <= entry["sdm/hr_verified"] <= 1.0
