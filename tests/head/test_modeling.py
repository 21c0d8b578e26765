import copy
import json
import math

import numpy as np
import pytest
import torch

from sdm_hf import SDMConfig, SDMHead
from sdm_hf.maths.activation import sdm_activation
from tests.helpers import gaussian_mixture


def test_predict_fields_and_consistency(small_head):
    head, x, _ = small_head
    out = head.predict(x[:50], k_neighbors=3)
    assert out.logits.shape == (50, 2) and out.probabilities.shape == (50, 2)
    assert torch.equal(out.prediction, out.logits.argmax(1))
    torch.testing.assert_close(out.probabilities, sdm_activation(out.logits, out.q.float(), out.d))
    assert torch.equal(out.is_ood, out.q == 0)
    assert bool((out.d >= 0).all() and (out.d <= 1).all())
    assert bool((out.d_lower <= out.d).all() and (out.d_upper >= out.d).all())
    # HR <=> the set {c : sdm_c >= psi_c} is exactly {y_hat} (the HR rule), given the q' rule
    psi = head.thresholds.float()
    above = out.probabilities >= psi
    singleton = (above.sum(1) == 1) & above.gather(1, out.prediction[:, None]).squeeze(1)
    rule = singleton & ~out.is_ood & (out.rescaled_similarity >= head.q_min)
    assert torch.equal(out.in_hr, rule)
    assert bool((out.in_hr_lower <= out.in_hr).all())  # the lower bound only tightens
    assert out.neighbor_indices.shape == (50, 3)
    assert torch.equal(out.neighbor_indices[:, 0], out.nearest_index)
    records = head.predict_records(x[:2])
    json.dumps(records)
    assert records[0]["label"] in ("neg", "pos")


def test_hr_region_is_nonempty_and_accurate_on_easy_data(small_head):
    head, x, y = small_head
    assert math.isfinite(head.q_min)
    out = head.predict(x[300:])
    assert out.in_hr.float().mean() > 0.2
    assert (out.prediction[out.in_hr] == y[300:][out.in_hr]).float().mean() >= 0.9


def test_recalibrate_alpha_and_report(small_head):
    head = copy.deepcopy(small_head[0])
    q_min_90 = head.q_min
    report = head.calibration_report(alphas=(0.8, 0.95))
    rows = {(r["alpha"], r["class"]): r for r in report.to_dict()["rows"]}
    assert set(rows) == {(a, c) for a in (0.8, 0.9, 0.95) for c in (0, 1)}
    assert "| 0.90 * |" in report.to_markdown()
    assert rows[(0.9, 0)]["n"] + rows[(0.9, 1)]["n"] == 300
    head.recalibrate(alpha=0.8)
    assert head.alpha == 0.8 and head.q_min <= q_min_90
    assert head.calibration_report(alphas=()).rows[0]["q_min"] == rows[(0.8, 0)]["q_min"]
    with pytest.warns(UserWarning, match="empty"):
        head.recalibrate(alpha=1.0)
    assert head.q_min == math.inf and not head.predict(small_head[1][:20]).in_hr.any()
    json.dumps(head.calibration_report().to_dict())  # strict JSON: no Infinity


def test_add_to_support_and_recompute(small_head):
    head = copy.deepcopy(small_head[0])
    _, x, y = small_head
    extra_x, extra_y = gaussian_mixture(100, 2, 8, separation=1.5, seed=11)
    before = head.support.ntotal
    cal_before = head.calibration_arrays
    head.add_to_support(extra_x, extra_y)
    assert head.support.ntotal == before + 100 and head.calibration_is_stale
    for key, value in head.calibration_arrays.items():  # unchanged until recalibrated
        assert torch.equal(value, cal_before[key])
    # a point added to the support is now its own nearest neighbour
    out = head.predict(extra_x[:5])
    assert out.nearest_index.tolist() == list(range(before, before + 5))
    head.recalibrate(recompute=True)
    assert not head.calibration_is_stale
    # recompute equals a fresh calibration against the grown support
    fresh = copy.deepcopy(head)
    fresh.calibrate(x[300:], y[300:])
    for key, value in head.calibration_arrays.items():
        assert torch.equal(value, fresh.calibration_arrays[key]), key


def test_label_errors_sorted(small_head):
    head, x, y = small_head
    noisy = y[300:].clone()
    out = head.predict(x[300:])
    flip = out.in_hr.nonzero().squeeze(1)[:10]
    noisy[flip] = 1 - noisy[flip]
    errors = head.label_errors(x[300:], noisy)
    assert set(flip.tolist()) <= set(errors.index.tolist())
    keys = list(zip(errors.probability.tolist(), errors.rescaled_similarity.tolist()))
    assert keys == sorted(keys, reverse=True)
    assert errors.to_list({0: "neg", 1: "pos"})[0]["label"] in ("neg", "pos")


def test_ids_and_texts_explanations():
    x, y = gaussian_mixture(60, 2, 4, seed=5)
    head = SDMHead(SDMConfig(input_dim=4, exemplar_dim=8), generator=torch.Generator().manual_seed(0))
    head.build_support(x[:30], y[:30], ids=[f"doc{i}" for i in range(30)], texts=[f"t{i}" for i in range(30)])
    with pytest.warns(UserWarning):
        head.calibrate(x[30:], y[30:], alpha=0.99)
    out = head.predict(x[:3])
    assert out.nearest_id == [f"doc{i}" for i in out.nearest_index.tolist()]
    with pytest.raises(ValueError, match="ids"):
        head.add_to_support(x[:2], y[:2])


@pytest.mark.parametrize(
    "bad, match, error",
    [
        (torch.randn(5, 3), "input_dim=8", ValueError),
        (torch.tensor([[float("nan")] * 8] * 5), "NaN", ValueError),
        (torch.randn(5), "2-D", ValueError),
        ("text", "torch.Tensor", TypeError),
        (np.array([["a"] * 4] * 5), "real numbers", TypeError),
    ],
)
def test_bad_features(small_head, bad, match, error):
    with pytest.raises(error, match=match):
        small_head[0].predict(bad)


def test_bad_labels_and_order_of_calls():
    head = SDMHead(SDMConfig(input_dim=4, exemplar_dim=8))
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="build_support"):
        head.predict(x)
    with pytest.raises(ValueError, match="build_support"):
        head.calibrate(x, torch.zeros(10))
    with pytest.raises(ValueError, match=r"0\.\.1"):
        head.build_support(x, torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(TypeError, match="integer"):
        head.build_support(x, torch.tensor([0.5] * 10))
    with pytest.raises(ValueError, match="9 labels"):
        head.build_support(x, torch.zeros(9).long())
    with pytest.raises(ValueError, match="at least 2 points of every class"):
        head.build_support(x, torch.tensor([0] * 9 + [1]))
    head.build_support(x, torch.tensor([0, 1] * 5))
    with pytest.raises(ValueError, match="calibrate"):
        head.predict(x)
    with pytest.raises(ValueError, match="alpha"):
        head.calibrate(x, torch.tensor([0, 1] * 5), alpha=0.4)
    with pytest.raises(ValueError, match="calibration set"):
        head.calibrate(x, torch.tensor([1] * 10))


def test_device_move_keeps_support_with_weights(small_head):
    head = copy.deepcopy(small_head[0])
    head.to("cpu")
    assert head.support.device == torch.device("cpu") and head.support.backend == "faiss-cpu"
    if torch.cuda.is_available():  # pragma: no cover - exercised on GPU machines only
        head.to("cuda")
        assert head.support.device.type == "cuda"
        out = head.predict(small_head[1][:10])
        assert out.prediction.device.type == "cpu"


@pytest.mark.parametrize("index_type, storage", [("ivf", "float32"), ("hnsw", "float16"), ("flat", "float16")])
def test_index_choices_agreement_and_round_trip(small_head, tmp_path, index_type, storage):
    head, x, y = small_head
    cfg = SDMConfig.from_dict(
        {
            **head.config.to_dict(),
            "index_type": index_type,
            "support_storage": storage,
            "index_params": {"nlist": 8, "nprobe": 4} if index_type == "ivf" else None,
        }
    )
    other = SDMHead(cfg)
    other.load_state_dict(head.state_dict())
    other.build_support(x[:300], y[:300])
    other.calibrate(x[300:], y[300:])
    assert other.support.index_type == index_type and other.support.storage == storage
    report = other.index_agreement(x[300:])
    assert report["n"] == 300 and report["same_hr"] >= 0.9 and report["same_q"] >= 0.8
    other.save_pretrained(tmp_path / "h")
    loaded = SDMHead.from_pretrained(tmp_path / "h")
    assert loaded.config.index_type == index_type and loaded.support.vectors.dtype == other.support.vectors.dtype
    if index_type != "hnsw":  # HNSW construction is multi-threaded; IVF and flat rebuild identically
        assert torch.equal(loaded.predict(x[:50]).q, other.predict(x[:50]).q)


def test_support_accepts_a_bare_index_and_recompute_warns_at_the_caller(small_head):
    import warnings

    from sdm_hf.head.support import SupportSet
    from sdm_hf.search.index import SupportIndex

    head, x, y = small_head
    support = head.support
    head.support = SupportIndex(support.vectors.float(), support.labels, support.predictions)
    assert isinstance(head.support, SupportSet) and head.support.ntotal == support.ntotal
    with pytest.raises(TypeError, match="SupportSet or SupportIndex"):
        head.support = "not a support set"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        head.recalibrate(alpha=1.0, recompute=True)  # nothing reaches accuracy 1.0 with a margin
    empty = [w for w in caught if "high-reliability region is empty" in str(w.message)]
    assert empty and all(w.filename == __file__ for w in empty)


def test_model_card_keeps_the_hub_mixin_tags(small_head):
    head, _, _ = small_head
    text = str(head.generate_model_card())
    for tag in ("model_hub_mixin", "sdm", "selective-classification", "uncertainty-quantification"):
        assert f"- {tag}" in text, tag
