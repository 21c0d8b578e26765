"""Known out-of-distribution rows in the support set (label -1): q = 0 next to them."""

import pytest
import torch

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head


def test_queries_next_to_known_ood_rows_are_ood_and_survive_a_round_trip(small_head, tmp_path):
    head, x, _ = small_head
    far = x[:6] * 0 + 40.0 + torch.randn(6, x.shape[1], generator=torch.Generator().manual_seed(0))
    head.add_to_support(far, ood=True)
    assert head.support.labels[-6:].tolist() == [-1] * 6
    after = head.predict(far + 1e-3)  # near duplicates of the OOD rows: their nearest exemplar is one
    assert bool((after.q == 0).all()) and bool(after.is_ood.all()) and not bool(after.in_hr.any())
    assert head.predict(x[300:320]).q.float().mean() > 0  # in-distribution queries keep their q
    head.recalibrate(recompute=True)
    head.save_pretrained(tmp_path / "h")
    loaded = SDMHead.from_pretrained(tmp_path / "h")
    assert loaded.support.labels[-6:].tolist() == [-1] * 6
    assert bool((loaded.predict(far).q == 0).all())
    head.generate_model_card()  # the card's per-class support counts leave the OOD rows out (no error)


def test_fit_takes_known_ood_points_and_bad_calls_are_refused(small_head):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 4, generator=g)
    y = (x[:, 0] > 0).long()
    ood = torch.randn(10, 4, generator=g) + 25.0
    head = fit_sdm_head(
        x[:100], y[:100], x[100:], y[100:], SDMConfig(input_dim=4, exemplar_dim=8, alpha=0.9),
        epochs=2, shuffles=1, learning_rate=1e-3, progress=False, ood_x=ood,
    )  # fmt: skip
    assert int((head.support.labels == -1).sum()) == 10
    assert bool((head.predict(ood + 1e-3).q == 0).all())
    fitted, _, _ = small_head
    with pytest.raises(ValueError, match="ood=True without y"):
        fitted.add_to_support(torch.zeros(2, fitted.config.input_dim))  # neither labels nor ood=True
    with pytest.raises(ValueError, match="ood=True without y"):
        fitted.add_to_support(torch.zeros(2, fitted.config.input_dim), torch.tensor([0, 1]), ood=True)
