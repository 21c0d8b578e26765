from sdm_hf import SDMConfig
from sdm_hf.head.model_card import card_data, render_model_card


def test_card_of_a_calibrated_head_shows_the_calibration(small_head):
    head, _, _ = small_head
    data = card_data(head.config, head.alpha, head.support.labels, head.calibration, repo_hint="me/repo")
    assert data.support_size == 300 and data.calibration_size == 300
    assert [c["label"] for c in data.classes] == ["neg", "pos"]
    assert sum(c["support"] for c in data.classes) == 300
    text = str(render_model_card(data))
    assert "library_name: sdm_hf" in text and "me/repo" in text and "| 0.90 *" in text


def test_card_before_calibration():
    cfg = SDMConfig(input_dim=4, base_model="some/model")
    data = card_data(cfg, cfg.alpha, None, None)
    assert data.admission == "not calibrated" and data.title == "SDM head for some/model"
    assert "base_model: some/model" in str(render_model_card(data))
