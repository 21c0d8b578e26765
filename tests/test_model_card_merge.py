"""The card of a model repository that carries an SDM head: the model's own card (a PEFT
adapter's, a Trainer's, one a user wrote) is kept and the head is merged in."""

import pytest
from huggingface_hub import EvalResult, ModelCard
from transformers import BertModel

from sdm_hf.head.model_card import (
    CALIBRATION_DATASET_TYPE,
    SECTION_END,
    SECTION_START,
    card_data,
    merge_model_card,
)
from sdm_hf.repository import save_sdm_model
from tests.helpers import tiny_bert

SDM_TAGS = ["sdm", "selective-classification", "uncertainty-quantification"]


def expected_results(head):
    """``{metric_name: value}`` the card must carry, computed from the head's own report."""
    report = head.calibration_report(alphas=())
    rows = [r for r in report.rows if r["alpha"] == head.alpha]
    cal = head.calibration
    admitted, n = report.admitted_at()
    out = {f"HR admission rate (alpha={head.alpha})": round(admitted / n, 4)}
    for r in rows:
        out[f"HR admission rate (class {r['label']}, alpha={head.alpha})"] = round(r["admitted_fraction"], 4)
        if r["accuracy"] is not None:
            out[f"HR accuracy (class {r['label']}, alpha={head.alpha})"] = round(r["accuracy"], 4)
    right = sum(round(r["accuracy"] * r["admitted"]) for r in rows if r["accuracy"] is not None)
    out[f"HR accuracy (alpha={head.alpha})"] = round(right / admitted, 4)
    assert admitted > 0 and n == cal.size  # the fixture's head admits points: the accuracies are there
    return out


@pytest.fixture
def adapter(tmp_path):
    peft = pytest.importorskip("peft")
    tiny_bert(hidden=8)[0].save_pretrained(tmp_path / "base")
    return peft.get_peft_model(
        BertModel.from_pretrained(tmp_path / "base"), peft.LoraConfig(r=2, target_modules=["query", "value"])
    )


def test_peft_adapter_card_is_kept_and_gains_the_sdm_head(adapter, small_head, tmp_path):
    head, _, _ = small_head
    adapter.save_pretrained(tmp_path / "peft-only")
    peft_card = ModelCard.load(tmp_path / "peft-only" / "README.md")
    assert peft_card.data.library_name == "peft"

    root = save_sdm_model(adapter, head, tmp_path / "adapter")
    card = ModelCard.load(root / "README.md")
    assert card.data.library_name == "peft"
    assert card.data.base_model == peft_card.data.base_model
    assert card.data.tags[: len(peft_card.data.tags)] == peft_card.data.tags  # base_model:adapter:..., lora, ...
    assert any(t.startswith("base_model:adapter:") for t in card.data.tags) and "lora" in card.data.tags
    assert card.data.tags[-3:] == SDM_TAGS
    assert card.data.license is None  # none invented
    assert "# Model Card for Model ID" in card.text and "## Model Details" in card.text  # PEFT's body kept
    assert card.text.count(SECTION_START) == 1 and card.text.count(SECTION_END) == 1
    assert (
        card.text.index("# Model Card for Model ID")
        < card.text.index(SECTION_START)
        < card.text.index("## Model Details")
    )
    assert "load_sdm_model" in card.text and "(sdm_head/README.md)" in card.text and "| 1 | pos |" in card.text
    # the head's own full card lives with the head
    head_card = ModelCard.load(root / "sdm_head" / "README.md")
    assert head_card.data.library_name == "sdm_hf" and "What the HR region promises" in head_card.text


def test_resaving_replaces_the_section_instead_of_adding_one(adapter, small_head, tmp_path):
    head, _, _ = small_head
    root = save_sdm_model(adapter, head, tmp_path / "adapter")
    first = (root / "README.md").read_text()
    head.recalibrate(alpha=0.8)
    save_sdm_model(adapter, head, root)  # PEFT reads the merged card back and rewrites it first
    card = ModelCard.load(root / "README.md")
    assert card.text.count(SECTION_START) == 1 and card.text.count("## SDM head") == 1
    assert card.data.library_name == "peft"
    assert sorted(card.data.tags) == sorted(set(card.data.tags))  # no tag twice
    alphas = {r.metric_args["alpha"] for r in card.data.eval_results}
    assert alphas == {0.8}  # the old results were replaced, not appended
    assert "| alpha | 0.8 |" in card.text and "| alpha | 0.8 |" not in first
    save_sdm_model(adapter, head, root)
    assert (root / "README.md").read_text() == str(card)  # a third save with nothing new changes nothing


def test_model_without_a_card_gets_the_sdm_card(small_head, tmp_path):
    head, _, _ = small_head
    head.config.base_model = "someone/tiny-bert"
    root = save_sdm_model(tiny_bert(hidden=8)[0], head, tmp_path / "plain")
    card = ModelCard.load(root / "README.md")
    assert card.data.library_name == "transformers"  # the root is a transformers model
    assert card.data.base_model == "someone/tiny-bert"
    assert card.data.tags == SDM_TAGS and card.data.license is None
    assert card.text.lstrip().startswith("# plain") and card.text.count(SECTION_START) == 1
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == expected_results(head)
    assert card.data.model_name == "plain"
    save_sdm_model(tiny_bert(hidden=8)[0], head, root)
    assert ModelCard.load(root / "README.md").text.count(SECTION_START) == 1


def test_eval_results_parse_back_with_the_calibration_values(small_head, tmp_path):
    head, _, _ = small_head
    root = save_sdm_model(tiny_bert(hidden=8)[0], head, tmp_path / "repo")
    for path in (root / "README.md", root / "sdm_head" / "README.md"):
        results = ModelCard.load(path).data.eval_results
        assert {r.metric_name: r.metric_value for r in results} == expected_results(head)
        for r in results:
            assert r.dataset_type == CALIBRATION_DATASET_TYPE and r.dataset_split == "calibration"
            assert "calibration" in r.dataset_name.lower() and "not a test estimate" in r.dataset_name
            assert r.task_type == "text-classification" and r.metric_type in ("coverage", "accuracy")
            assert r.verified is None  # the Hub computes it
            assert r.metric_args["alpha"] == head.alpha


def test_uncalibrated_head_writes_no_results(tmp_path):
    from sdm_hf import SDMConfig, SDMHead

    head = SDMHead(SDMConfig(input_dim=8, exemplar_dim=4))
    root = save_sdm_model(tiny_bert(hidden=8)[0], head, tmp_path / "repo")
    card = ModelCard.load(root / "README.md")
    assert card.data.eval_results is None and "model-index" not in (root / "README.md").read_text()
    assert "| 0 | 0 | 0 | - | - |" in card.text


def test_license_is_kept_or_set_explicitly_never_invented(small_head, tmp_path):
    head, _, _ = small_head
    root = tmp_path / "licensed"
    root.mkdir()
    (root / "README.md").write_text("---\nlicense: mit\nlibrary_name: transformers\n---\n\n# Mine\n\nMy words.\n")
    save_sdm_model(tiny_bert(hidden=8)[0], head, root)
    card = ModelCard.load(root / "README.md")
    assert card.data.license == "mit" and "My words." in card.text
    assert ModelCard.load(root / "sdm_head" / "README.md").data.license == "mit"  # the repository's license
    save_sdm_model(tiny_bert(hidden=8)[0], head, root, license="apache-2.0", model_card_kwargs={"tags": ["demo"]})
    card = ModelCard.load(root / "README.md")
    assert card.data.license == "apache-2.0" and card.data.tags == [*SDM_TAGS, "demo"]
    assert ModelCard.load(root / "sdm_head" / "README.md").data.license == "apache-2.0"
    save_sdm_model(tiny_bert(hidden=8)[0], head, tmp_path / "none")
    assert ModelCard.load(tmp_path / "none" / "sdm_head" / "README.md").data.license is None
    with pytest.raises(TypeError, match="license"):
        save_sdm_model(tiny_bert(hidden=8)[0], head, tmp_path / "bad", license=2)


def test_models_own_eval_results_are_kept(small_head):
    head, _, _ = small_head
    theirs = EvalResult(
        task_type="text-classification", dataset_type="imdb", dataset_name="IMDB", metric_type="f1", metric_value=0.9
    )
    existing = ModelCard("---\nlibrary_name: transformers\n---\n\n# m\n")
    existing.data.eval_results, existing.data.model_name = [theirs], "m"
    existing = ModelCard(str(existing))
    data = card_data(
        head.config, head.alpha, head.support.labels, head.calibration, repo_hint="m", subfolder="sdm_head"
    )
    merged = merge_model_card(existing, data)
    types = [r.dataset_type for r in ModelCard(str(merged)).data.eval_results]
    assert types[0] == "imdb" and set(types[1:]) == {CALIBRATION_DATASET_TYPE}
    assert ModelCard(str(merged)).data.model_name == "m"
    assert existing.text.count(SECTION_START) == 0  # the caller's card is not changed


def test_damaged_markers_are_reported(small_head):
    head, _, _ = small_head
    data = card_data(
        head.config, head.alpha, head.support.labels, head.calibration, repo_hint="m", subfolder="sdm_head"
    )
    damaged = ModelCard(f"---\nlibrary_name: peft\n---\n\n# m\n\n{SECTION_START}\nhalf a section\n")
    with pytest.raises(ValueError, match="remove the damaged section"):
        merge_model_card(damaged, data)


def test_card_without_a_heading_gets_the_section_first(small_head):
    head, _, _ = small_head
    data = card_data(head.config, head.alpha, head.support.labels, head.calibration, repo_hint="m", subfolder="heads/a")
    merged = merge_model_card(ModelCard("---\nlibrary_name: peft\n---\nJust text.\n"), data)
    assert merged.text.index(SECTION_START) < merged.text.index("Just text.")
    assert 'subfolder="heads/a"' in merged.text and "(heads/a/README.md)" in merged.text


def test_trainer_card_with_an_empty_model_index_stays_valid(tmp_path):
    from sdm_hf import SDMConfig

    cfg = SDMConfig(input_dim=4)
    data = card_data(cfg, cfg.alpha, None, None, repo_hint="out", subfolder="sdm_head")
    trainer_card = ModelCard(
        "---\nlibrary_name: transformers\nlicense: apache-2.0\ntags:\n- generated_from_trainer\n"
        "model-index:\n- name: out\n  results: []\n---\n\n"
        "# out\n\nThis model is a fine-tuned version of x.\n\n## Training\n"
    )
    merged = ModelCard(str(merge_model_card(trainer_card, data)))
    assert merged.data.to_dict()["model-index"] == [{"name": "out", "results": []}]
    assert "model_name" not in merged.data.to_dict() and merged.data.license == "apache-2.0"
    assert merged.data.tags == ["generated_from_trainer", *SDM_TAGS]
    text = merged.text
    assert text.index("fine-tuned version of x.") < text.index(SECTION_START) < text.index("## Training")
