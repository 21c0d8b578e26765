import numpy as np
import pytest
import torch

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head
from sdm_hf.fit import _search_space, _search_vectors, balanced_sdm_loss
from sdm_hf.index import SupportIndex
from sdm_hf.similarity import compute_similarity
from tests.conftest import gaussian_mixture

FAST = dict(epochs=3, shuffles=2, learning_rate=3e-3, progress=False)


def _data(n=200, classes=2, dim=6, seed=0):
    x, y = gaussian_mixture(n, classes, dim, separation=2.0, seed=seed)
    return x[: n // 2], y[: n // 2], x[n // 2 :], y[n // 2 :]


def test_deterministic():
    data = _data()
    cfg = SDMConfig(input_dim=6, exemplar_dim=16, alpha=0.9)
    a = fit_sdm_head(*data, cfg, seed=7, **FAST)
    b = fit_sdm_head(*data, cfg, seed=7, **FAST)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert a.training_history == [
        dict(h, seconds=a.training_history[i]["seconds"]) for i, h in enumerate(b.training_history)
    ]
    out_a, out_b = a.predict(data[2]), b.predict(data[2])
    for field in ("probabilities", "q", "d", "in_hr", "in_hr_lower"):
        assert torch.equal(getattr(out_a, field), getattr(out_b, field))
    c = fit_sdm_head(*data, cfg, seed=8, **FAST)
    assert not torch.equal(a.adaptor.weight, c.adaptor.weight)


def test_history_callback_and_selection():
    seen = []
    head = fit_sdm_head(*_data(), SDMConfig(input_dim=6, exemplar_dim=16, alpha=0.9), callback=seen.append, **FAST)
    assert len(seen) == len(head.training_history) == 6
    assert [(h["shuffle"], h["epoch"]) for h in seen] == [(s, e) for s in range(2) for e in range(3)]
    losses = [h["calibration_loss"] for h in seen]
    best = max(i for i, v in enumerate(losses) if v == min(losses))  # ties go to the later one
    assert (head.selection["shuffle"], head.selection["epoch"]) == (seen[best]["shuffle"], seen[best]["epoch"])
    for key in ("train_loss", "train_accuracy", "calibration_accuracy", "calibration_ood_fraction", "seconds"):
        assert key in seen[0]


def test_resplit_false_keeps_split_and_true_resplits():
    x_tr, y_tr, x_ca, y_ca = _data(n=201)
    cfg = SDMConfig(input_dim=6, exemplar_dim=16, alpha=0.9)
    kept = fit_sdm_head(x_tr, y_tr, x_ca, y_ca, cfg, resplit=False, **FAST)
    assert kept.selection["support_rows"].tolist() == list(range(100))
    assert kept.support.ntotal == 100
    mixed = fit_sdm_head(x_tr, y_tr, x_ca, y_ca, cfg, resplit=True, **FAST)
    rows = mixed.selection["support_rows"].tolist()
    assert len(rows) == 100 and mixed.selection["calibration_rows"].numel() == 101  # odd one to calibration
    assert set(rows) != set(range(100))
    assert sorted(rows + mixed.selection["calibration_rows"].tolist()) == list(range(201))


def test_four_classes():
    x, y = gaussian_mixture(1200, 4, 8, separation=3.0, label_noise=0.01, seed=1)
    cfg = SDMConfig(input_dim=8, num_classes=4, exemplar_dim=32, alpha=0.9)
    head = fit_sdm_head(
        x[:400], y[:400], x[400:800], y[400:800], cfg, epochs=30, shuffles=1, learning_rate=3e-3, progress=False
    )
    out = head.predict(x[800:])
    assert out.probabilities.shape == (400, 4) and head.thresholds.shape == (4,)
    assert set(out.prediction.tolist()) == {0, 1, 2, 3}
    admitted = out.in_hr
    assert admitted.float().mean() > 0.2
    assert (out.prediction[admitted] == y[800:][admitted]).float().mean() > 0.9
    assert len(head.calibration_report().rows) == 3 * 4  # default alphas 0.8, 0.9, 0.95 (0.9 is the chosen one)


def test_search_space_trick_agrees_with_exemplar_space():
    head = SDMHead(SDMConfig(input_dim=6, exemplar_dim=64), generator=torch.Generator().manual_seed(0))  # 4 D <= M
    x, y = gaussian_mixture(300, 3, 6, seed=2)
    normalized = head.normalize(x)
    with torch.no_grad():
        exemplars, logits = head.encode(normalized)
    pred = logits.argmax(1)
    low = _search_vectors(head, normalized, _search_space(head))
    assert low.shape == (300, 6)
    results = []
    for vectors in (exemplars, low):
        index = SupportIndex(vectors[:200], y[:200], pred[:200])
        results.append(
            compute_similarity(
                index,
                vectors,
                pred,
                y[:200],
                pred[:200],
                self_index=torch.cat([torch.arange(200), torch.full((100,), -1)]),
            )
        )
    assert torch.equal(results[0].q, results[1].q)
    assert torch.equal(results[0].nearest_index, results[1].nearest_index)
    torch.testing.assert_close(results[0].d_nearest, results[1].d_nearest, rtol=1e-4, atol=1e-4)


def test_balanced_loss():
    loss = torch.tensor([1.0, 3.0, 10.0])
    assert balanced_sdm_loss(loss, torch.tensor([0, 0, 1]), 3) == pytest.approx((2.0 + 10.0) / 2)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(calib_x=torch.randn(100, 5)), ValueError, "5 features"),
        (dict(train_y=torch.full((100,), 2)), ValueError, r"0\.\.1"),
        (dict(calib_y=torch.zeros(100).long()), ValueError, "calib_y needs at least 2 points"),
        (dict(train_x=np.full((100, 6), np.inf)), ValueError, "NaN or infinite"),
        (dict(train_y=torch.zeros(99).long()), ValueError, "99 labels"),
        (dict(epochs=0), ValueError, "epochs"),
        (dict(learning_rate=-1.0), ValueError, "learning_rate"),
        (dict(config="nope"), TypeError, "SDMConfig"),
        (dict(config=SDMConfig(input_dim=7)), ValueError, "input_dim=7"),
        (dict(train_ids=["a"] * 100), ValueError, "both"),
    ],
)
def test_bad_input(change, error, match):
    x_tr, y_tr, x_ca, y_ca = _data()
    args = dict(train_x=x_tr, train_y=y_tr, calib_x=x_ca, calib_y=y_ca, config=SDMConfig(input_dim=6, exemplar_dim=8))
    args.update(FAST)
    args.update(change)
    with pytest.raises(error, match=match):
        fit_sdm_head(**args)


def test_numpy_inputs_and_default_config():
    x_tr, y_tr, x_ca, y_ca = (t.numpy() for t in _data())
    head = fit_sdm_head(x_tr, y_tr, x_ca, y_ca, epochs=1, shuffles=1, progress=False)
    assert head.config.input_dim == 6 and head.config.num_classes == 2 and head.config.exemplar_dim == 1000
