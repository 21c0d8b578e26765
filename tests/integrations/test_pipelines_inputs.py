"""Every input kind transformers pipelines take, against the pipelines' previous (whole-call)
implementation: strings, lists, tuples, datasets columns and rows, KeyDataset, generators and
iterators; batch_size 1..32 and num_workers; errors that name the input."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import pipeline
from transformers.pipelines.pt_utils import KeyDataset

import sdm_hf  # noqa: F401  (registers the tasks)
from sdm_hf.features.extract import extract_features
from sdm_hf.lm.generation import generate_greedy
from sdm_hf.lm.verification_features import verification_features
from tests.helpers import build_encoder_repo, build_lm_repo, random_texts


def reference_classification(clf, texts, batch_size=8):
    """What sdm-text-classification returned before it followed the Pipeline contract: the
    features of the whole call in one extract_features, one predict."""
    cfg = clf.sdm_head.config
    limit = cfg.feature_max_length or getattr(clf.tokenizer, "model_max_length", 512)
    lengths = [len(ids) for ids in clf.tokenizer(texts, truncation=False)["input_ids"]]
    feats = extract_features(
        clf.model,
        clf.tokenizer,
        texts,
        pooling=cfg.feature_pooling or "mean",
        layer=-1 if cfg.feature_layer is None else cfg.feature_layer,
        batch_size=batch_size,
        max_length=limit,
        progress=False,
    )
    rows = []
    for i, r in enumerate(clf.sdm_head.predict(feats).to_list(cfg.id2label)):
        rows.append(
            {
                "label": r["label"],
                "score": r["probability"],
                "high_reliability": r["high_reliability"],
                "high_reliability_lower": r["high_reliability_lower"],
                "is_ood": r["is_ood"],
                "q": r["q"],
                "d": r["d"],
                "rescaled_similarity": r["rescaled_similarity"],
                "truncated": lengths[i] > limit,
                "nearest_exemplar": clf._nearest(r["nearest_index"]),
            }
        )
    return rows


def reference_verify(verify, items, batch_size=8, max_new_tokens=5):
    """What sdm-verify returned before: all generations of the call, then all features."""
    prompts, completions, to_generate = [], [], []
    for i, item in enumerate(items):
        if isinstance(item, dict):
            prompts.append(item["prompt"])
            completions.append(item["completion"])
        else:
            prompts.append(item)
            completions.append(None)
            to_generate.append(i)
    if to_generate:
        texts = generate_greedy(
            verify.model, verify.tokenizer, [prompts[i] for i in to_generate], max_new_tokens, batch_size
        )
        for i, text in zip(to_generate, texts):
            completions[i] = text
    feats = verification_features(verify.model, verify.tokenizer, prompts, completions, verify.control, batch_size)
    out = verify.sdm_head.predict(feats)
    rows = []
    for i, r in enumerate(out.to_list()):
        verified = bool(out.prediction[i] == 1)
        rows.append(
            {
                "generated_text": completions[i],
                "verified": verified,
                "probability": float(out.probabilities[i, 1]),
                "high_reliability": r["high_reliability"],
                "high_reliability_lower": r["high_reliability_lower"],
                "q": r["q"],
                "d": r["d"],
                "rescaled_similarity": r["rescaled_similarity"],
                "is_ood": r["is_ood"],
                "model_said": verify.control.decision(completions[i]),
                "nearest_exemplar": verify._nearest(r["nearest_index"]),
            }
        )
    return rows


def assert_same(got, expected, tol=1e-5):
    """Equal results: the same keys, labels, booleans and counts; floats within ``tol``."""
    assert isinstance(got, list) and len(got) == len(expected)
    for a, b in zip(got, expected):
        assert set(a) == set(b)
        for key in a:
            if isinstance(b[key], float):
                assert math.isclose(a[key], b[key], rel_tol=tol, abs_tol=tol), (key, a[key], b[key])
            else:
                assert a[key] == b[key], (key, a[key], b[key])


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    path, _, _ = build_encoder_repo(tmp_path_factory.mktemp("enc"))
    return pipeline("sdm-text-classification", model=str(path), device="cpu")


@pytest.fixture(scope="module")
def texts():
    # not support texts (whose nearest exemplar is themselves at distance 0: ties)
    return random_texts(13, seed=11)


@pytest.fixture(scope="module")
def expected(clf, texts):
    return reference_classification(clf, texts)


@pytest.mark.parametrize("batch_size", [1, 3, 8, 32])
def test_lists_match_the_whole_call_at_every_batch_size(clf, texts, expected, batch_size):
    assert_same(clf(texts, batch_size=batch_size), expected)
    assert_same(clf(tuple(texts), batch_size=batch_size), expected)


def test_a_string_gives_one_result(clf, texts, expected):
    one = clf(texts[4])
    assert isinstance(one, dict)
    assert_same([one], expected[4:5])


def test_datasets_column_keydataset_generator_iterator(clf, texts, expected):
    ds = Dataset.from_dict({"text": texts, "n": list(range(len(texts)))})
    assert_same(clf(ds["text"], batch_size=4), expected)  # a datasets column: a list of results
    streamed = clf(KeyDataset(ds, "text"), batch_size=4)
    assert not isinstance(streamed, list)  # an iterator, as for any transformers pipeline
    assert_same(list(streamed), expected)
    assert_same(list(clf((t for t in texts), batch_size=5)), expected)
    assert_same(list(clf(iter(texts), batch_size=2)), expected)
    assert clf(t for t in []) == []  # transformers' answer to an empty generator


def test_rows_with_text_column(clf, texts, expected):
    """Every input kind of rows the README lists: a Dataset, a streaming IterableDataset, a list
    of dicts, a generator of dicts, one dict."""
    from datasets import IterableDataset

    ds = Dataset.from_dict({"sentence": texts, "n": list(range(len(texts)))})
    assert_same(clf(ds, text_column="sentence", batch_size=4), expected)
    stream = IterableDataset.from_generator(lambda: ({"sentence": t, "n": i} for i, t in enumerate(texts)))
    assert_same(list(clf(stream, text_column="sentence", batch_size=4)), expected)
    rows = [{"sentence": t} for t in texts]
    assert_same(clf(rows, text_column="sentence"), expected)
    assert_same(list(clf((r for r in rows), text_column="sentence", batch_size=3)), expected)
    assert_same([clf(rows[2], text_column="sentence")], expected[2:3])
    with pytest.raises(ValueError, match=r"not a column of the dataset \(columns: \['sentence', 'n'\]\)"):
        clf(ds, text_column="text")
    with pytest.raises(ValueError, match="input 1 has no column 'sentence'"):
        clf([{"sentence": "a"}, {"other": "b"}], text_column="sentence")
    with pytest.raises(TypeError, match="pass text_column="):
        clf(rows)  # rows without text_column: the error says what to pass


def test_generators_stream(clf, texts):
    pulled = []

    def source():
        for t in texts:
            pulled.append(t)
            yield t

    results = clf(source(), batch_size=2)
    first = next(iter(results))
    assert first["label"] in ("neg", "pos")
    assert len(pulled) < len(texts)  # not read to the end for the first result


def test_num_workers(clf, texts, expected):
    assert_same(clf(texts, batch_size=4, num_workers=2), expected)
    ds = Dataset.from_dict({"text": texts})
    assert_same(list(clf(KeyDataset(ds, "text"), batch_size=3, num_workers=2)), expected)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_the_batched_forward_reads_extract_features(clf, texts, batch_size, monkeypatch):
    import sdm_hf.integrations.pipelines.text_classification as module

    seen = {}
    real = module.extract_features

    def spy(model, tokenizer, batch, **kwargs):
        feats = real(model, tokenizer, batch, **kwargs)
        seen.update(zip(batch, feats))
        return feats

    monkeypatch.setattr(module, "extract_features", spy)
    clf(texts, batch_size=batch_size)
    whole = extract_features(clf.model, clf.tokenizer, texts, pooling="mean", max_length=10, progress=False)
    # the features of every text, from batches padded differently, equal the whole call's
    torch.testing.assert_close(torch.stack([seen[t] for t in texts]), whole, atol=1e-5, rtol=1e-5)


def test_a_list_is_batched_by_length_and_answered_in_order(clf, texts, expected, monkeypatch):
    import sdm_hf.integrations.pipelines.text_classification as module

    batches = []
    real = module.extract_features
    monkeypatch.setattr(module, "extract_features", lambda m, t, b, **k: batches.append(list(b)) or real(m, t, b, **k))
    assert_same(clf(texts, batch_size=4), expected)
    assert [len(b) for b in batches] == [4, 4, 4, 1]
    tokens = {t: len(clf.tokenizer(t)["input_ids"]) for t in texts}
    assert [t for b in batches for t in b] == sorted(texts, key=lambda t: -tokens[t])
    batches.clear()
    list(clf(iter(texts), batch_size=4))  # a stream is batched as it comes
    assert [t for b in batches for t in b] == texts


def test_left_padded_decoder_features_do_not_depend_on_the_batch(tmp_path):
    # a causal LM as the encoder, padded on the left: positions count from each text's first token
    from sdm_hf.repository import save_sdm_model
    from tests.helpers import harvard_sentences, head_on, tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    model = tiny_causal_lm(tokenizer)
    sentences = harvard_sentences(40)
    feats = extract_features(model, tokenizer, sentences, pooling="mean_last", progress=False)
    head = head_on(feats, torch.arange(40) % 2, feature_pooling="mean_last")
    save_sdm_model(model, head, tmp_path / "repo", tokenizer=tokenizer)
    lm_clf = pipeline("sdm-text-classification", model=str(tmp_path / "repo"), device="cpu")
    lm_clf.tokenizer.padding_side = "left"  # (save_pretrained does not keep it)
    queries = [s[: 10 + 7 * i] for i, s in enumerate(harvard_sentences(50)[40:])]
    assert_same(lm_clf(queries, batch_size=4), lm_clf(queries, batch_size=1), tol=1e-4)


def test_errors_name_the_input(clf, texts, monkeypatch):
    calls = []
    monkeypatch.setattr(clf, "_forward", lambda *a, **k: calls.append(1))
    with pytest.raises(TypeError, match=r"the input is None; .* pass a string, a list of them"):
        clf(None)
    with pytest.raises(TypeError, match="the input is of type int"):
        clf(3)
    with pytest.raises(TypeError, match="the input is of type dict"):
        clf({"text": texts[0]})
    with pytest.raises(TypeError, match="input 2 is None"):
        clf([texts[0], texts[1], None, 7])
    with pytest.raises(TypeError, match="input 1 is of type list"):
        clf([texts[0], [texts[1]]])
    assert calls == []  # an in-memory list is checked before any model work
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['top_k'\] .* valid options: \[\]"):
        clf(texts, top_k=2)
    with pytest.raises(ValueError, match="unknown option"):
        clf((t for t in texts), top_k=2)


def test_streamed_errors_name_the_input(clf, texts):
    with pytest.raises(TypeError, match="input 3 is of type int"):
        list(clf((x for x in [*texts[:3], 5, texts[4]]), batch_size=2))
    ds = Dataset.from_dict({"text": texts[:3], "n": [1, 2, 3]})
    with pytest.raises(TypeError, match="input 0 is of type int"):
        list(clf(KeyDataset(ds, "n"), batch_size=2))
    with pytest.raises(TypeError, match="input 0 is of type dict"):
        clf(ds)  # rows are dicts: pass ds["text"] or KeyDataset(ds, "text")


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path, prompts, completions = build_lm_repo(tmp_path_factory.mktemp("lm"))
    verify = pipeline("sdm-verify", model=str(path), device="cpu", max_new_tokens=5)
    return verify, prompts, completions


def test_verify_mixed_inputs_match_the_whole_call(lm):
    verify, prompts, completions = lm
    chat = [{"role": "user", "content": prompts[5]}]
    items = [prompts[0], {"prompt": prompts[1], "completion": completions[1]}, chat, prompts[3]]
    items += [{"prompt": prompts[4], "completion": completions[4]}]
    # batch_size 1 generates prompt by prompt, as the reference at batch_size 1
    assert_same(verify(items, batch_size=1), reference_verify(verify, items, batch_size=1))
    # batch_size 8: the three prompts are generated in one batch, as in the reference
    assert_same(verify(items, batch_size=8), reference_verify(verify, items, batch_size=8))
    assert_same([verify(chat)], reference_verify(verify, [chat]))  # one conversation, one result
    assert isinstance(verify(chat), dict)


def test_verify_datasets_keydataset_generators(lm):
    verify, prompts, completions = lm
    rows = Dataset.from_dict({"prompt": prompts[6:12], "completion": completions[6:12]})
    expected = reference_verify(verify, [dict(r) for r in rows])
    assert_same(verify(rows, batch_size=4), expected)  # a datasets.Dataset's rows
    assert_same(list(verify((dict(r) for r in rows), batch_size=3)), expected)
    assert_same(list(verify(rows.to_iterable_dataset(), batch_size=3)), expected)  # a streaming dataset
    generated = reference_verify(verify, prompts[6:10], batch_size=2)
    assert_same(list(verify(KeyDataset(rows, "prompt"), batch_size=2))[:4], generated)
    assert_same(verify(prompts[6:10], batch_size=2, num_workers=2), generated)


def test_verify_errors_name_the_input(lm):
    verify, prompts, completions = lm
    with pytest.raises(
        ValueError, match=r"input 1: a dict input needs 'prompt' and 'completion' keys \(got \['text'\]\)"
    ):
        verify([prompts[0], {"text": "x"}])
    with pytest.raises(TypeError, match="the input: 'completion' is None; pass a string"):
        verify({"prompt": "x", "completion": None})
    with pytest.raises(TypeError, match="input 1 is of type int"):
        verify([prompts[0], 5])
    with pytest.raises(TypeError, match="input 0 is of type list but not chat messages"):
        verify([["a", "b"]])
    with pytest.raises(TypeError, match="the input is None"):
        verify(None)
    with pytest.raises(TypeError, match="input 2 is of type float"):
        list(verify((x for x in [prompts[0], prompts[1], 1.5]), batch_size=2))
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        verify(prompts[0], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"generate_kwargs may not set \['do_sample'\]"):
        verify(prompts[0], generate_kwargs={"do_sample": True})
    with pytest.raises(TypeError, match="force_decode must be True or False"):
        verify(prompts[0], force_decode="yes")
    valid = r"\['force_decode', 'generate_kwargs', 'max_new_tokens', 'search_depth', 'search_kwargs'\]"
    with pytest.raises(ValueError, match=f"valid options: {valid}"):
        verify([prompts[0]], temperature=0.5)
    assert verify([]) == []
