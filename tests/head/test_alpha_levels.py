"""SDMConfig.alphas: several HR regions (risk tiers) from one calibration."""

import copy
import dataclasses
import json
import math

import pytest
import torch

from sdm_hf import SDMConfig, SDMHead
from sdm_hf.head.serialization import FORMAT_VERSION


def _with_tiers(head, alphas):
    head.config = dataclasses.replace(head.config, alphas=alphas)  # validated like any SDMConfig
    return head


def test_each_tier_equals_the_head_recalibrated_at_that_alpha(small_head):
    head, x, _ = small_head
    head.recalibrate(alpha=0.9)
    _with_tiers(head, [0.99, 0.8, 0.8])
    out = head.predict(x[300:])
    assert out.hr_alphas.tolist() == pytest.approx([0.8, 0.9, 0.99])
    assert torch.equal(out.in_hr_at[:, 1], out.in_hr)  # the head's own alpha is one of the tiers
    admitted = out.in_hr_at.sum(0).tolist()
    assert admitted[0] >= admitted[1] >= admitted[2] and admitted[0] > 0  # lower alpha, larger region
    for k, alpha in enumerate(out.hr_alphas.tolist()):
        alone = copy.deepcopy(head)
        alone.config = dataclasses.replace(alone.config, alphas=None)
        alone.recalibrate(alpha=alpha)
        assert torch.equal(out.in_hr_at[:, k], alone.predict(x[300:]).in_hr), alpha
    highest = out.highest_hr_alpha
    for i in range(len(out)):
        admitted = [a for a, ok in zip(out.hr_alphas.tolist(), out.in_hr_at[i].tolist()) if ok]
        assert (math.isnan(highest[i]) and not admitted) or highest[i] == pytest.approx(max(admitted))
    records = out.to_list()
    assert all("high_reliability_alpha" in r for r in records)
    assert {r["high_reliability_alpha"] for r in records} <= {None, *out.hr_alphas.tolist()}
    for r, flags in zip(records, out.in_hr_at.tolist()):  # every tier's membership, keyed by the alpha
        assert r["high_reliability_at"] == {"0.8": flags[0], "0.9": flags[1], "0.99": flags[2]}
    json.dumps(records, allow_nan=False)


def test_tiers_are_saved_with_the_head(small_head, tmp_path):
    head, x, _ = small_head
    head.save_pretrained(tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain["sdm_hf_format_version"] == FORMAT_VERSION and "alphas" not in plain["config"]
    assert SDMHead.from_pretrained(tmp_path / "plain").predict(x[:5]).in_hr_at is None
    _with_tiers(head, [0.8, 0.99]).save_pretrained(tmp_path / "tiers")
    saved = json.loads((tmp_path / "tiers" / "config.json").read_text())
    assert saved["sdm_hf_format_version"] == FORMAT_VERSION and saved["config"]["alphas"] == [0.8, 0.99]
    loaded = SDMHead.from_pretrained(tmp_path / "tiers")
    assert torch.equal(loaded.predict(x[300:]).in_hr_at, head.predict(x[300:]).in_hr_at)


def test_bad_tiers_are_refused():
    with pytest.raises(ValueError, match="alphas: every tier must satisfy"):
        SDMConfig(input_dim=4, alphas=[0.9, 0.3])
    with pytest.raises(TypeError, match="alphas must be a list of floats"):
        SDMConfig(input_dim=4, alphas="0.9")


def test_the_model_card_reports_every_tier(small_head):
    head, _, _ = small_head
    text = str(_with_tiers(head, [0.8, 0.99]).generate_model_card())
    for alpha in ("0.80", "0.99"):  # rows of the calibration table, one per class
        assert f"| {alpha} |" in text
