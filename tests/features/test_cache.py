"""The feature cache on a tiny model built here: hits, misses, corrupt entries, the default folder."""

import copy
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from sdm_hf.features.cache import cached_features, feature_cache_key
from sdm_hf.features.extract import extract_features
from sdm_hf.utils.files import default_cache_dir
from tests.helpers import TEXTS, Counter

pytestmark = pytest.mark.usefixtures("private_cache")  # nothing a test does lands in the user's cache


def entries(cache):
    return sorted(p.name for p in (cache / "features").iterdir())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SDM_HF_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SDM_HF_CACHE")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf" / "sdm_hf"


def test_second_call_is_a_hit_without_running_the_model(tmp_path, bpe, llama):
    cache = tmp_path / "cache"
    kwargs = {"pooling": "mean_last", "layer": 2, "model_id": "tiny", "cache_dir": cache, "progress": False}
    with Counter(llama) as counter:
        first = cached_features(llama, bpe, TEXTS, **kwargs)
        runs = counter.calls
        second = cached_features(llama, bpe, TEXTS, **kwargs)
        assert runs > 0 and counter.calls == runs  # the hit ran nothing
    assert torch.equal(first, second) and second.dtype == torch.float32 and second.shape == (4, 32)
    direct = extract_features(llama, bpe, TEXTS, pooling="mean_last", layer=2, progress=False)
    torch.testing.assert_close(first, direct, rtol=0, atol=0)
    names = entries(cache)
    assert len(names) == 2 and {Path(n).suffix for n in names} == {".json", ".safetensors"}
    meta = json.loads((cache / "features" / [n for n in names if n.endswith(".json")][0]).read_text())
    assert meta["fields"]["model_id"] == "tiny" and meta["fields"]["n"] == 4 and meta["dim"] == 32
    assert meta["fields"]["layer"] == 2 and meta["fields"]["max_length"] == 64  # max_position_embeddings


def test_default_cache_dir_is_used(bpe, llama):
    cached_features(llama, bpe, TEXTS[:2], model_id="tiny", progress=False)
    assert len(list((default_cache_dir() / "features").iterdir())) == 2


def test_any_change_of_the_key_misses(tmp_path, bpe, llama):
    cache = tmp_path / "cache"
    base = {"pooling": "mean", "layer": -1, "max_length": None, "model_id": "tiny", "revision": None}
    left = copy.deepcopy(bpe)
    left.padding_side = "left"
    variants = [
        ({}, TEXTS, bpe),
        ({"model_id": "other"}, TEXTS, bpe),
        ({"revision": "r2"}, TEXTS, bpe),
        ({"layer": 1}, TEXTS, bpe),
        ({"pooling": "last"}, TEXTS, bpe),
        ({"max_length": 8}, TEXTS, bpe),
        ({}, TEXTS[:-1] + ["rice is often served in round bowl"], bpe),
        ({}, TEXTS[::-1], bpe),
        ({}, TEXTS, left),
    ]
    with Counter(llama) as counter:
        for i, (change, texts, tokenizer) in enumerate(variants):
            before = counter.calls
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "2 of 4 texts were longer", UserWarning)
                cached_features(llama, tokenizer, texts, **{**base, **change}, cache_dir=cache, progress=False)
            assert counter.calls > before, change
            assert len(entries(cache)) == 2 * (i + 1)
        before = counter.calls  # -1 and num_hidden_layers are the same layer: one entry
        cached_features(llama, bpe, TEXTS, **{**base, "layer": 3}, cache_dir=cache, progress=False)
        assert counter.calls == before
    reversed_back = cached_features(llama, bpe, TEXTS[::-1], **base, cache_dir=cache, progress=False)
    forward = cached_features(llama, bpe, TEXTS, **base, cache_dir=cache, progress=False)
    torch.testing.assert_close(reversed_back, forward.flip(0), rtol=1e-5, atol=1e-5)


def test_texts_are_hashed_with_their_lengths(bpe, llama):
    a, _ = feature_cache_key(llama, bpe, ["ab", "c"], model_id="tiny")
    b, _ = feature_cache_key(llama, bpe, ["a", "bc"], model_id="tiny")
    c, fields = feature_cache_key(llama, bpe, ["ab", "c"], model_id="tiny")
    assert a != b and a == c
    assert set(fields) >= {"model_id", "revision", "layer", "pooling", "max_length", "padding_side", "tokenizer_class"}


@pytest.mark.parametrize("damage", ["junk weights", "flipped byte", "truncated json", "other rows"])
def test_corrupt_entry_is_logged_and_recomputed(tmp_path, bpe, llama, damage, caplog):
    cache = tmp_path / "cache"
    kwargs = {"model_id": "tiny", "cache_dir": cache, "progress": False}
    good = cached_features(llama, bpe, TEXTS, **kwargs)
    key, _ = feature_cache_key(llama, bpe, TEXTS, model_id="tiny")
    weights, meta = cache / "features" / f"{key}.safetensors", cache / "features" / f"{key}.json"
    if damage == "junk weights":
        weights.write_bytes(b"not a safetensors file")
    elif damage == "flipped byte":
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x40
        weights.write_bytes(bytes(data))
    elif damage == "truncated json":
        meta.write_text(meta.read_text()[:20])
    else:  # a well-formed entry of another text list stored under this key
        key_other, _ = feature_cache_key(llama, bpe, TEXTS[:2], model_id="tiny")
        cached_features(llama, bpe, TEXTS[:2], **kwargs)
        weights.write_bytes((cache / "features" / f"{key_other}.safetensors").read_bytes())
        meta.write_text((cache / "features" / f"{key_other}.json").read_text())
    with Counter(llama) as counter, caplog.at_level(logging.WARNING, logger="sdm_hf.features.cache"):
        again = cached_features(llama, bpe, TEXTS, **kwargs)
    assert counter.calls > 0 and torch.equal(again, good)
    assert any("is corrupt" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    with Counter(llama) as counter:  # the entry was rewritten
        assert torch.equal(cached_features(llama, bpe, TEXTS, **kwargs), good) and counter.calls == 0


def test_use_cache_false_and_anonymous_models(tmp_path, bpe, llama):
    cache = tmp_path / "cache"
    out = cached_features(llama, bpe, TEXTS, cache_dir=cache, use_cache=False, progress=False)
    assert out.shape == (4, 16) and not cache.exists()
    with pytest.raises(ValueError, match="pass model_id="):  # built from a config: no name to key on
        cached_features(llama, bpe, TEXTS, cache_dir=cache, progress=False)
    with pytest.raises(ValueError, match="-4 <= layer <= 3"):
        cached_features(llama, bpe, TEXTS, layer=7, model_id="tiny", cache_dir=cache, progress=False)
    with pytest.raises(TypeError, match="strings"):
        cached_features(llama, bpe, ["a", None], model_id="tiny", cache_dir=cache, progress=False)
