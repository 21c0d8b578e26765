import pytest
from huggingface_hub import ModelCard

from sdm_hf import SDMConfig
from sdm_hf.head.model_card import CALIBRATION_DATASET_TYPE, card_data, eval_results, render_model_card


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


def test_model_card_kwargs_set_metadata_tags_and_template_variables(small_head):
    head, _, _ = small_head
    card = head.generate_model_card(
        repo_hint="me/repo", license="cc-by-4.0", tags=["demo"], language=["en"], datasets="me/data"
    )
    parsed = ModelCard(str(card))
    assert parsed.data.license == "cc-by-4.0" and parsed.data.language == ["en"] and parsed.data.datasets == "me/data"
    assert parsed.data.tags[-1] == "demo" and "sdm" in parsed.data.tags and parsed.data.library_name == "sdm_hf"
    assert parsed.data.model_name == "repo"
    custom = head.generate_model_card(
        template_str="---\n{{ card_data }}\n---\n# {{ owner }} at {{ alpha }}\n", owner="Ann"
    )
    assert custom.text.strip() == "# Ann at 0.9"
    assert ModelCard(str(head.generate_model_card())).data.license is None  # never invented
    with pytest.raises(TypeError, match="license"):
        head.generate_model_card(license=["mit"])
    with pytest.raises(TypeError, match="tags"):
        head.generate_model_card(tags=[1])


def test_eval_results_of_a_calibrated_head(small_head):
    head, _, _ = small_head
    data = card_data(head.config, head.alpha, head.support.labels, head.calibration)
    results = eval_results(data)
    rows = {r["label"]: r for r in head.calibration_report(alphas=()).rows}
    by_name = {r.metric_name: r for r in results}
    for label in ("neg", "pos"):
        coverage = by_name[f"HR admission rate (class {label}, alpha=0.9)"]
        assert coverage.metric_type == "coverage" and coverage.metric_args == {"alpha": 0.9, "class": label}
        assert coverage.metric_value == round(rows[label]["admitted_fraction"], 4)
        if rows[label]["accuracy"] is not None:
            assert by_name[f"HR accuracy (class {label}, alpha=0.9)"].metric_value == round(rows[label]["accuracy"], 4)
    overall = by_name["HR admission rate (alpha=0.9)"]
    assert overall.metric_value == round(data.overall["admitted"] / 300, 4)
    assert all(r.dataset_type == CALIBRATION_DATASET_TYPE and r.dataset_split == "calibration" for r in results)
    assert eval_results(card_data(SDMConfig(input_dim=4), 0.9, None, None)) == []


def test_local_base_model_paths_stay_out_of_the_metadata(tmp_path):
    cfg = SDMConfig(input_dim=4, base_model=str(tmp_path))
    text = str(render_model_card(card_data(cfg, cfg.alpha, None, None)))
    assert "base_model:" not in text.split("---")[1]  # the Hub wants a model id there
    assert str(tmp_path) in text  # the body still records where the features came from
