"""The two pipelines' outputs, options and errors (see also tests/integrations/test_pipelines_*.py)."""

import copy

import pytest
import torch
from transformers import pipeline

import sdm_hf  # noqa: F401  (registers the tasks)
from sdm_hf import SDMConfig, SDMHead
from sdm_hf.features.extract import extract_features
from tests.helpers import WORDS, build_encoder_repo, build_lm_repo, random_texts


@pytest.fixture(scope="module")
def encoder_repo(tmp_path_factory):
    return build_encoder_repo(tmp_path_factory.mktemp("enc"))


def test_text_classification_single_and_batched(encoder_repo):
    path, head, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cpu")
    one = clf(texts[0])
    assert set(one) == {
        "label",
        "score",
        "high_reliability",
        "high_reliability_lower",
        "is_ood",
        "q",
        "d",
        "rescaled_similarity",
        "truncated",
        "nearest_exemplar",
    }
    assert one["label"] in ("neg", "pos") and set(one["nearest_exemplar"]) == {"index", "id", "label", "text"}
    many = clf(texts[:5], batch_size=2)
    assert len(many) == 5 and many[0] == one
    # the same numbers as the head on the same features (new texts: a support text's nearest
    # exemplar is itself at distance 0, where float rounding of the padding may reorder ties)
    new = random_texts(6, seed=7)
    expected = clf.sdm_head.predict(extract_features(clf.model, clf.tokenizer, new, progress=False))
    assert [r["q"] for r in clf(new, batch_size=4)] == expected.q.tolist()
    long = clf(" ".join(WORDS))
    assert long["truncated"] is True


def test_text_classification_errors(encoder_repo, tmp_path):
    path, head, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cpu")
    with pytest.raises(ValueError, match="unknown option"):
        clf(texts[0], temperature=2)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['top_k'\].*valid options"):
        pipeline("sdm-text-classification", model=str(path), device="cpu", top_k=1)  # at construction too
    assert clf([]) == [] and clf(()) == []  # a list maps to a list of results, an empty one to []
    with pytest.raises(ValueError, match="unknown option"):
        clf([], temperature=2)
    bare = tmp_path / "bare"
    clf.model.save_pretrained(bare)
    clf.tokenizer.save_pretrained(bare)
    with pytest.raises(ValueError, match="sdm_head="):
        pipeline("sdm-text-classification", model=str(bare), device="cpu")
    explicit = pipeline("sdm-text-classification", model=str(bare), sdm_head=str(path / "sdm_head"), device="cpu")
    assert explicit(texts[0])["q"] == clf(texts[0])["q"]
    wrong = SDMHead(SDMConfig(input_dim=8, exemplar_dim=4, feature_pooling="mean_last"))
    with pytest.raises(ValueError, match="16"):
        pipeline("sdm-text-classification", model=str(bare), sdm_head=wrong, device="cpu")(texts[0])


@pytest.fixture(scope="module")
def lm_repo(tmp_path_factory):
    return build_lm_repo(tmp_path_factory.mktemp("lm"))


def test_verify_generate_and_verify_only(lm_repo):
    path, prompts, completions = lm_repo
    verify = pipeline("sdm-verify", model=str(path), device="cpu", max_new_tokens=5)
    generated = verify(prompts[0])
    assert set(generated) == {
        "generated_text",
        "verified",
        "probability",
        "high_reliability",
        "high_reliability_lower",
        "q",
        "d",
        "rescaled_similarity",
        "is_ood",
        "model_said",
        "nearest_exemplar",
    }
    assert isinstance(generated["generated_text"], str) and 0 <= generated["probability"] <= 1
    checked = verify(
        [{"prompt": prompts[1], "completion": completions[1]}, {"prompt": prompts[2], "completion": completions[2]}],
        batch_size=2,
    )
    assert [r["model_said"] for r in checked] == [True, False]
    assert [r["generated_text"] for r in checked] == completions[1:3]
    mixed = verify([prompts[0], {"prompt": prompts[1], "completion": completions[1]}])
    assert mixed[0]["generated_text"] == generated["generated_text"] and mixed[1] == checked[0]


def test_verify_force_decode_and_errors(lm_repo):
    path, prompts, completions = lm_repo
    verify = pipeline("sdm-verify", model=str(path), device="cpu")
    out = verify({"prompt": prompts[3], "completion": completions[3]}, force_decode=True)
    suffix = "<verified>Yes</verified>" if out["verified"] else "<verified>No</verified>"
    assert out["generated_text"].endswith(suffix) and out["generated_text"].count("<verified>") == 1
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        verify({"prompt": "x"})
    with pytest.raises(ValueError, match="valid options"):
        verify("x", top_k=3)
    with pytest.raises(ValueError, match="the input is .* tokens long"):
        verify({"prompt": "the birch canoe " * 200, "completion": "x"})
    with pytest.raises(ValueError, match="input 1 is .* tokens long"):
        verify([{"prompt": "x", "completion": "y"}, {"prompt": "the birch canoe " * 200, "completion": "x"}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_path(encoder_repo):  # pragma: no cover - runs on GPU machines only
    path, _, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cuda")
    assert clf.sdm_head.support.device.type == "cuda"
    assert clf(texts[:3])[0]["label"] in ("neg", "pos")


def test_verify_search_returns_the_first_hr_verified_attempt_and_never_relabels(lm_repo, monkeypatch):
    import dataclasses

    import torch

    path, prompts, completions = lm_repo
    verify = pipeline("sdm-verify", model=str(path), device="cpu", max_new_tokens=5)
    head = verify.sdm_head
    real_predict = head.predict
    calls = {"n": 0}

    def second_call_verifies(x, *args, **kwargs):  # the 2nd verification (1st sampled attempt): HR "Yes"
        calls["n"] += 1
        out = real_predict(x, *args, **kwargs)
        if calls["n"] == 2:
            ones = torch.ones_like(out.prediction)
            out = dataclasses.replace(out, prediction=ones, in_hr=torch.ones_like(out.in_hr, dtype=torch.bool))
        return out

    monkeypatch.setattr(head, "predict", second_call_verifies)
    results = verify(prompts[:3] + [{"prompt": prompts[3], "completion": completions[3]}], batch_size=4, search_depth=3)
    assert calls["n"] == 2  # greedy, then one sampled round verified every open input: the search stopped
    for result in results[:3]:
        first, second = result["attempts"]
        assert not (first["verified"] and first["high_reliability"])
        assert second["verified"] and second["high_reliability"]
        assert (
            result["generated_text"] == second["generated_text"] and result["verified"] and result["high_reliability"]
        )
    assert "attempts" not in results[3]  # a given completion is verified, not searched
    monkeypatch.setattr(head, "predict", real_predict)
    plain = verify(prompts[:2], batch_size=2, search_depth=2, search_kwargs={"seed": 5, "temperature": 0.7})
    for result in plain:  # nothing verified in the HR region here: the greedy attempt with its own verdict
        assert 1 <= len(result["attempts"]) <= 2
        first = result["attempts"][0]
        hr_found = [a for a in result["attempts"] if a["verified"] and a["high_reliability"]]
        chosen = hr_found[0] if hr_found else first
        assert result["generated_text"] == chosen["generated_text"] and result["verified"] == chosen["verified"]
    with pytest.raises(ValueError, match="search_depth must be a positive integer"):
        verify(prompts[0], search_depth=0)
    with pytest.raises(ValueError, match="search_kwargs may not set"):
        verify(prompts[0], search_depth=2, search_kwargs={"do_sample": False})


def test_text_classification_reports_the_highest_tier_of_a_tiered_head(encoder_repo, tmp_path):
    import dataclasses

    from transformers import AutoModel, AutoTokenizer

    from sdm_hf.repository import save_sdm_model

    path, head, texts = encoder_repo
    tiered = copy.deepcopy(head)
    tiered.config = dataclasses.replace(tiered.config, alphas=[0.6, 0.99])
    save_sdm_model(AutoModel.from_pretrained(path), tiered, tmp_path / "tiered", AutoTokenizer.from_pretrained(path))
    clf = pipeline("sdm-text-classification", model=str(tmp_path / "tiered"), device="cpu")
    results = clf(texts[:20], batch_size=8)
    for r in results:  # the highest tier whose region admits the text; in the head's own region: >= its alpha
        assert r["high_reliability_alpha"] in (None, 0.6, head.alpha, 0.99)
        if r["high_reliability"]:
            assert r["high_reliability_alpha"] >= head.alpha
        assert set(r["high_reliability_at"]) == {"0.6", repr(float(head.alpha)), "0.99"}
        assert r["high_reliability_at"][repr(float(head.alpha))] == r["high_reliability"]
    assert "high_reliability_alpha" not in pipeline("sdm-text-classification", model=str(path), device="cpu")(texts[0])


def test_a_head_recorded_as_one_feature_block_is_fed_by_its_recipe(encoder_repo, tmp_path):
    """A head whose recipe sits in ``feature_blocks`` (one block: cls pooling at layer 0) is fed
    exactly those features, and pairing it with another model warns."""
    from transformers import AutoModel, AutoTokenizer

    from sdm_hf.repository import save_sdm_model
    from tests.helpers import head_on

    path, _, texts = encoder_repo
    model, tokenizer = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    feats = extract_features(model, tokenizer, texts, pooling="cls", layer=0, progress=False)
    block = {"model": "org/tiny-bert", "revision": None, "pooling": "cls", "layer": 0, "max_length": 10,
             "dim": feats.shape[1], "start": 0, "stop": feats.shape[1]}  # fmt: skip
    head = head_on(feats, torch.arange(80) % 2, feature_blocks=[block], id2label={0: "neg", 1: "pos"})
    assert head.config.feature_pooling is None and head.config.feature_recipe.pooling == "cls"
    model.config._name_or_path = "org/tiny-bert"
    save_sdm_model(model, head, tmp_path / "block", tokenizer=tokenizer)
    clf = pipeline("sdm-text-classification", model=str(tmp_path / "block"), device="cpu")
    assert (clf.pooling, clf.layer, clf.max_length) == ("cls", 0, 10)
    new = random_texts(6, seed=11)
    expected = head.predict(extract_features(model, tokenizer, new, pooling="cls", layer=0, progress=False))
    assert [r["label"] for r in clf(new)] == [["neg", "pos"][i] for i in expected.prediction.tolist()]
    with pytest.warns(UserWarning, match="fitted on features of 'org/tiny-bert' but is paired with"):
        pipeline("sdm-text-classification", model=str(path), sdm_head=head, device="cpu")


def test_batch_size_changes_no_decision(encoder_repo):
    """Documented tolerance: decisions (label, q, d, HR) equal at every batch size, probabilities
    within 1e-5 (float32 features change in their last bits with a batch's padding)."""
    path, _, texts = encoder_repo
    clf = pipeline("sdm-text-classification", model=str(path), device="cpu")
    queries = texts[40:] + random_texts(40, seed=3)  # the calibration texts and new ones
    outs = [clf(queries, batch_size=b) for b in (1, 7, 32)]
    for rows in zip(*outs):
        assert len({(r["label"], r["q"], r["d"], r["high_reliability"]) for r in rows}) == 1
        assert max(r["score"] for r in rows) - min(r["score"] for r in rows) <= 1e-5
