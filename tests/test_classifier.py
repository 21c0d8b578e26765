"""SDMClassifier: a model and labelled texts in, labelled decisions out; saved, loaded, served."""

import warnings

import pytest
from datasets import ClassLabel, Dataset, Features, Value
from transformers import pipeline

from sdm_hf import SDMClassifier
from tests.helpers import WORDS, random_texts, tiny_encoder

QUICK = {"procedure": "fast", "epochs": 2, "shuffles": 1, "progress": False}


def labelled(n, seed):
    texts = random_texts(n, seed=seed)
    # a rule the features can see: does the text hold one of the first ten words?
    labels = ["pos" if any(w in WORDS[:10] for w in t.split()) else "neg" for t in texts]
    return texts, labels


@pytest.fixture(scope="module")
def fitted():
    model, tokenizer = tiny_encoder()
    clf = SDMClassifier(model, tokenizer, model_id="org/tiny-bert")
    (tr, ytr), (ca, yca) = labelled(120, 1), labelled(120, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(tr, ytr, ca, yca, alpha=0.9, **QUICK)
    return clf


def test_string_labels_in_records_out(fitted):
    assert fitted.id2label == {0: "neg", 1: "pos"}
    one = fitted.predict("word0 word1")
    assert one["label"] in ("neg", "pos") and set(one["nearest_exemplar"]) == {"index", "id", "label", "text"}
    assert one["nearest_exemplar"]["text"] is not None  # the training texts are the explanations
    many = fitted.predict(random_texts(5, seed=9))
    assert len(many) == 5 and all(isinstance(r["high_reliability"], bool) for r in many)
    cfg = fitted.head.config
    assert (cfg.base_model, cfg.feature_pooling, cfg.feature_layer, cfg.feature_max_length) == (
        "org/tiny-bert",
        "mean",
        -1,
        10,
    )


def test_save_load_and_the_pipeline_agree(fitted, tmp_path):
    texts = random_texts(12, seed=4)
    expected = fitted.predict(texts)
    fitted.save_pretrained(tmp_path / "clf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the repository's own head: no pairing warning
        loaded = SDMClassifier.from_pretrained(tmp_path / "clf")
        served = pipeline("sdm-text-classification", model=str(tmp_path / "clf"), device="cpu")
    assert loaded.id2label == {0: "neg", 1: "pos"} and loaded.model_id == "org/tiny-bert"
    for got in (loaded.predict(texts), served(texts), fitted.pipeline()(texts)):
        assert [(r["label"], r["high_reliability"], r["q"]) for r in got] == [
            (r["label"], r["high_reliability"], r["q"]) for r in expected
        ]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_classlabel_datasets_and_a_held_out_split(tmp_path):
    model, tokenizer = tiny_encoder()
    texts, labels = labelled(160, 5)
    names = ["negative", "positive"]
    data = Dataset.from_dict(
        {"sentence": texts, "y": [names.index(v + "itive" if v == "pos" else "negative") for v in labels]},
        features=Features({"sentence": Value("string"), "y": ClassLabel(names=names)}),
    )
    clf = SDMClassifier(model, tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(data, text_column="sentence", label_column="y", alpha=0.9, **QUICK)  # half held out to calibrate
    assert clf.id2label == {0: "negative", 1: "positive"}
    assert clf.head.support.ntotal == 80 and clf.head.calibration.labels.numel() == 80
    assert clf.predict(texts[0])["label"] in names
    clf.save_pretrained(tmp_path / "named")  # the ClassLabel names round-trip
    assert SDMClassifier.from_pretrained(tmp_path / "named").id2label == {0: "negative", 1: "positive"}


def test_a_dry_run_push_writes_what_would_be_uploaded(fitted, tmp_path):
    out = fitted.push_to_hub("user/repo", dry_run=tmp_path / "preview")
    files = sorted(p.relative_to(out).as_posix() for p in (tmp_path / "preview").rglob("*") if p.is_file())
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "sdm_head/config.json",
        "sdm_head/model.safetensors",
    } <= set(files)
    only = fitted.push_to_hub("user/repo", dry_run=tmp_path / "head-only", allow_patterns=["sdm_head/*"])
    assert all(
        p.startswith("sdm_head/")
        for p in (q.relative_to(only).as_posix() for q in (tmp_path / "head-only").rglob("*") if q.is_file())
    )
    with pytest.raises(FileExistsError, match="not empty"):
        fitted.push_to_hub("user/repo", dry_run=tmp_path / "preview")


def test_errors_name_the_problem():
    model, tokenizer = tiny_encoder()
    clf = SDMClassifier(model, tokenizer)
    with pytest.raises(ValueError, match="not fitted"):
        clf.predict(["x"])
    with pytest.raises(ValueError, match="train_labels is required"):
        clf.fit(["a", "b"])
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        clf.fit(["a", "b"], ["x", "y", "z"])
    with pytest.raises(TypeError, match=r"train\[1\] must be a string"):
        clf.fit(["a", 3], ["x", "y"])
    with pytest.raises(ValueError, match="no column 'text'"):
        clf.fit(Dataset.from_dict({"t": ["a"], "label": [0]}))
    with pytest.raises(ValueError, match="calibration_fraction"):
        clf.fit(["a", "b"], ["x", "y"], calibration_fraction=1.5)
