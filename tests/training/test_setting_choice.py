"""The default ``"auto"`` procedure: calibration rows are Algorithm 1's only, the choice is made
on held-out training rows, and the selection reads as a few lines."""

import io
import warnings

import pytest
import torch

from sdm_hf import SDMConfig, fit_sdm_head
from sdm_hf.head.fit_selection import FitSelection
from sdm_hf.training.head_training import fit_progress_bar
from sdm_hf.training.setting_choice import AUTO_CANDIDATES, holdout_split
from tests.helpers import gaussian_mixture

QUICK = dict(epochs=8, progress=False)


def _data(n=400, classes=2, dim=6, seed=0):
    x, y = gaussian_mixture(n, classes, dim, separation=2.0, label_noise=0.02, seed=seed)
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


def _fit(*data, **kwargs):
    config = kwargs.pop("config", None) or SDMConfig(input_dim=data[0].shape[1], exemplar_dim=16, alpha=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_sdm_head(*data, config, **{**QUICK, **kwargs})


def test_auto_is_the_default_and_calibrates_on_exactly_the_calibration_rows():
    x_tr, y_tr, x_ca, y_ca = _data()
    head = _fit(x_tr, y_tr, x_ca, y_ca)
    sel = head.selection
    assert sel["procedure"] == "auto"
    assert sel["calibration_rows"].tolist() == list(range(200, 400))
    assert sel["support_rows"].tolist() == list(range(200))  # every training row is support
    held = set(sel["selection_rows"].tolist())
    assert held < set(range(200)) and abs(len(held) - 50) <= 2  # a quarter of each class, rounded
    assert torch.equal(head.calibration.labels, y_ca)
    assert head.support.ntotal == 200
    assert sel["chosen"] in [dict(c) for c in AUTO_CANDIDATES]
    assert head.config.normalization == sel["chosen"]["normalization"]
    assert {c["settings"]["normalization"] for c in sel["candidates"]} == {"scalar", "feature"}


def test_the_choice_never_reads_calibration_rows():
    """Noise in place of the calibration features: the same choice, epochs and weights; only
    Algorithm 1's output may move."""
    x_tr, y_tr, x_ca, y_ca = _data(seed=3)
    noise = torch.randn(x_ca.shape, generator=torch.Generator().manual_seed(9)) * 5
    a = _fit(x_tr, y_tr, x_ca, y_ca, seed=4)
    b = _fit(x_tr, y_tr, noise, y_ca, seed=4)
    assert a.selection["chosen"] == b.selection["chosen"]
    assert (a.selection["shuffle"], a.selection["epoch"]) == (b.selection["shuffle"], b.selection["epoch"])
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert torch.equal(a.feature_mean, b.feature_mean) and torch.equal(a.feature_std, b.feature_std)
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in a.training_history]
    assert history == [{k: v for k, v in h.items() if k != "seconds"} for h in b.training_history]
    assert not torch.equal(a.calibration.features, b.calibration.features)


def test_resplit_true_splits_once_and_keeps_the_calibration_half_apart():
    x_tr, y_tr, x_ca, y_ca = _data(n=402)
    head = _fit(x_tr, y_tr, x_ca, y_ca, resplit=True)
    sup, cal, sel = (head.selection[k].tolist() for k in ("support_rows", "calibration_rows", "selection_rows"))
    assert len(sup) == 201 and len(cal) == 201 and sorted(sup + cal) == list(range(402))
    assert set(sel) <= set(sup) and set(sup) != set(range(201))


def test_four_classes_and_custom_candidates():
    x, y = gaussian_mixture(1200, 4, 8, separation=3.0, label_noise=0.01, seed=1)
    candidates = [{"normalization": "feature", "exemplar_dim": 24}, {"exemplar_dim": 32}]
    config = SDMConfig(input_dim=8, num_classes=4, exemplar_dim=16, alpha=0.9)
    head = _fit(x[:600], y[:600], x[600:900], y[600:900], config=config, candidates=candidates, epochs=30)
    assert head.selection["chosen"] in candidates
    assert head.config.exemplar_dim == head.selection["chosen"]["exemplar_dim"]
    assert head.adaptor.weight.shape[0] == head.config.exemplar_dim
    out = head.predict(x[900:])
    assert out.in_hr.float().mean() > 0.2
    assert (out.prediction[out.in_hr] == y[900:][out.in_hr]).float().mean() > 0.9


def test_a_candidate_may_set_the_learning_rate():
    candidates = [{"learning_rate": 1e-2}, {"normalization": "feature", "learning_rate": 1e-4}]
    head = _fit(*_data(), candidates=candidates)
    assert head.selection["chosen"] in candidates
    assert "learning_rate" not in head.config.to_dict()  # a training setting, not part of the head
    slow, quick = (_fit(*_data(), candidates=[{"learning_rate": r}], epochs=2) for r in (1e-5, 1e-1))
    # the candidate's rate is the one it trains with: 10,000 times the rate, a far larger change
    drops = [h.training_history[0]["train_loss"] - h.training_history[1]["train_loss"] for h in (slow, quick)]
    assert abs(drops[1]) > 10 * abs(drops[0])


def test_the_selection_prints_as_a_few_lines():
    head = _fit(*_data())
    text = str(head.selection)
    assert len(text.splitlines()) <= 6 and len(text) < 800, text
    assert "chosen: normalization=" in text and "estimated admitted" in text
    assert "procedure 'auto'" in repr(head.selection)
    assert isinstance(head.selection, FitSelection) and isinstance(head.selection, dict)
    paper = _fit(*_data(), procedure="paper", shuffles=1, epochs=2)
    assert len(str(paper.selection).splitlines()) == 2


def test_the_kept_candidate_is_the_largest_held_estimate():
    head = _fit(*_data(n=600, seed=5), epochs=20)
    candidates = head.selection["candidates"]
    held = [c for c in candidates if c["holds"] and c["admitted_share"] > 0]
    if held:
        best = max(c["admitted_share"] for c in held)
        first = next(c for c in held if c["admitted_share"] == best)
        assert head.selection["chosen"] == first["settings"]
    else:
        lowest = min(c["loss"] for c in candidates)
        assert head.selection["chosen"] == next(c for c in candidates if c["loss"] == lowest)["settings"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(holdout_fraction=0.0), ValueError, "holdout_fraction"),
        (dict(holdout_fraction=1.0), ValueError, "holdout_fraction"),
        (dict(shuffles=3), ValueError, "shuffles applies to 'paper' and 'fast'"),
        (dict(selection_fraction=0.2), ValueError, "holdout_fraction"),
        (dict(candidates=[]), TypeError, "candidates"),
        (dict(candidates={"normalization": "feature"}), TypeError, "candidates"),
        (dict(candidates=[{"epochs": 3}]), ValueError, "keys among"),
        (dict(candidates=[{"learning_rate": -1.0}]), ValueError, "learning_rate must be a positive"),
        (dict(candidates=[{"normalization": "none"}]), ValueError, "normalization"),
        (dict(procedure="paper", candidates=[{"normalization": "feature"}]), ValueError, "'auto' only"),
        (dict(procedure="fast", holdout_fraction=0.3), ValueError, "'auto' only"),
    ],
)
def test_bad_auto_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        _fit(*_data(n=100), **kwargs)


def test_too_few_training_rows_of_a_class_is_a_clear_error():
    x = torch.randn(20, 4)
    y = torch.tensor([0] * 3 + [1] * 7)
    with pytest.raises(ValueError, match="at least 4 per class.*procedure='fast'"):
        _fit(x[:10], y, x[10:], y, config=SDMConfig(input_dim=4, exemplar_dim=8, alpha=0.9))


def test_holdout_split_is_per_class_and_seeded():
    y = torch.tensor([0] * 10 + [1] * 30)
    fit_a, held_a = holdout_split(y, 2, 0.5, torch.Generator().manual_seed(0))
    fit_b, held_b = holdout_split(y, 2, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(held_a, held_b) and torch.equal(fit_a, fit_b)
    assert torch.bincount(y[held_a]).tolist() == [5, 15]
    assert sorted(fit_a.tolist() + held_a.tolist()) == list(range(40))


def test_progress_bar_writes_lines_to_a_log():
    stream = io.StringIO()
    import sys

    old, sys.stderr = sys.stderr, stream
    try:
        bar = fit_progress_bar(10, "fit", True)
        bar.update(10)
        bar.close()
    finally:
        sys.stderr = old
    text = stream.getvalue()
    assert "\r" not in text and "epochs at most" in text and text.endswith("\n")
    assert fit_progress_bar(5, "fit", False).disable


def test_the_history_marks_the_refit_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from sdm_hf.evaluation.plots import plot_training_history

    head = _fit(*_data())
    runs = [h["shuffle"] for h in head.training_history]
    assert all(isinstance(r, int) for r in runs) and set(runs) == {0, 1, 2}  # two candidates, then the refit
    refit = [h for h in head.training_history if h.get("refit")]
    assert {h["shuffle"] for h in refit} == {2} and len(refit) == head.selection["epoch"] + 1
    plot_training_history({"auto": head.training_history}, tmp_path / "h.png", selections={"auto": head.selection})
    assert (tmp_path / "h.png").stat().st_size > 0
