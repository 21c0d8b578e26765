"""The feature cache and the causal-LM loader (GGUF conversion cached), on tiny models built here."""

import copy
import hashlib
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from sdm_hf import feature_cache
from sdm_hf.feature_cache import cached_features, default_cache_dir, feature_cache_key, load_causal_lm
from sdm_hf.features import extract_features

TEXTS = ["the birch canoe slid on the smooth planks", "glue the sheet", "a", "rice is often served in round bowls"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Nothing a test does lands in the user's cache."""
    monkeypatch.setenv("SDM_HF_CACHE", str(tmp_path / "default-cache"))


class Counter:
    """Counts forward passes of the model's body."""

    def __init__(self, model):
        self.calls = 0
        self.handle = model.model.register_forward_pre_hook(self.hook)

    def hook(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


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
def test_corrupt_entry_warns_and_recomputes(tmp_path, bpe, llama, damage):
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
    with Counter(llama) as counter, pytest.warns(UserWarning, match="corrupt"):
        again = cached_features(llama, bpe, TEXTS, **kwargs)
    assert counter.calls > 0 and torch.equal(again, good)
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


# -- load_causal_lm ---------------------------------------------------------------------------
def test_local_folder_loads(tmp_path, bpe, llama):
    folder = tmp_path / "tiny-llama"
    llama.save_pretrained(folder)
    bpe.save_pretrained(folder)
    model, tokenizer = load_causal_lm(folder, progress=False, local_files_only=True)
    assert not model.training and type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer("glue the sheet")["input_ids"] == bpe("glue the sheet")["input_ids"]
    for name, value in llama.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with Counter(model) as counter:  # a named model keys on its path: no model_id needed
        first = cached_features(model, tokenizer, TEXTS, cache_dir=tmp_path / "c", progress=False)
        second = cached_features(model, tokenizer, TEXTS, cache_dir=tmp_path / "c", progress=False)
        assert counter.calls == 1 and torch.equal(first, second)


def test_missing_gguf(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FileNotFoundError, match=r"model\.gguf.*assemble\(\)"):
        load_causal_lm(missing, cache_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        load_causal_lm(tmp_path, gguf_file="other.gguf", cache_dir=tmp_path, progress=False)


def test_corrupt_gguf(tmp_path):
    random_bytes = tmp_path / "x.gguf"
    random_bytes.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"x\.gguf.*corrupt or incomplete"):
        load_causal_lm(random_bytes, cache_dir=tmp_path, progress=False)
    bad_header = tmp_path / "y.gguf"  # the magic bytes, then garbage: transformers fails to parse it
    bad_header.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(ValueError, match=r"y\.gguf.*corrupt or incomplete"):
        load_causal_lm(bad_header, cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_gguf_package_missing(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 32)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        load_causal_lm(path, cache_dir=tmp_path, progress=False)


@pytest.fixture
def fake_conversion(monkeypatch, bpe, llama):
    """Stands in for transformers' GGUF de-quantisation: returns (a copy of) the tiny model."""
    calls = []

    def read(path):
        calls.append(path)
        return copy.deepcopy(llama), copy.deepcopy(bpe)

    monkeypatch.setattr(feature_cache, "_read_gguf", read)
    return calls


def test_gguf_conversion_is_cached(tmp_path, fake_conversion, llama):
    path = tmp_path / "src" / "m.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"a" * 100)
    cache = tmp_path / "cache"
    first, _ = load_causal_lm(path, cache_dir=cache, progress=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    folder = cache / "models" / digest
    assert fake_conversion == [path] and not first.training
    marker = json.loads((folder / "sdm_hf_converted.json").read_text())
    assert marker["source_file"] == "m.gguf" and marker["source_size"] == 108 and marker["sha256"] == digest
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in (cache / "models").iterdir()] == [digest]  # no temporary folder left behind

    second, tokenizer = load_causal_lm(path.parent, gguf_file="m.gguf", cache_dir=cache, progress=False)
    assert len(fake_conversion) == 1 and not second.training  # loaded from the cached folder
    assert Path(second.config._name_or_path) == folder
    for name, value in llama.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    source = {"model_id": "m.gguf", "revision": f"sha256:{digest}"}
    assert first.sdm_hf_source == second.sdm_hf_source == source

    # both loads key their features the same way, so the second model reuses the first one's features
    feats = cached_features(first, tokenizer, TEXTS, cache_dir=cache, progress=False)
    with Counter(second) as counter:
        assert torch.equal(cached_features(second, tokenizer, TEXTS, cache_dir=cache, progress=False), feats)
        assert counter.calls == 0

    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"b" * 100)  # changed content: a new key, converted again
    third, _ = load_causal_lm(path, cache_dir=cache, progress=False)
    new_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(fake_conversion) == 2 and (cache / "models" / new_digest / "sdm_hf_converted.json").is_file()
    assert third.sdm_hf_source["revision"] == f"sha256:{new_digest}"
    bfloat, _ = load_causal_lm(path, cache_dir=cache, progress=False, torch_dtype=torch.bfloat16)
    assert len(fake_conversion) == 2 and next(bfloat.parameters()).dtype == torch.bfloat16


def test_half_written_or_broken_copies_are_not_trusted(tmp_path, fake_conversion):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"c" * 100)
    cache = tmp_path / "cache"
    folder = cache / "models" / hashlib.sha256(path.read_bytes()).hexdigest()
    folder.mkdir(parents=True)  # a crashed writer's folder: files but no marker
    (folder / "config.json").write_text("{}")
    load_causal_lm(path, cache_dir=cache, progress=False)
    assert len(fake_conversion) == 1 and (folder / "sdm_hf_converted.json").is_file()

    (folder / "model.safetensors").write_bytes(b"junk")  # complete marker, broken weights
    with pytest.warns(UserWarning, match="could not be loaded"):
        model, _ = load_causal_lm(path, cache_dir=cache, progress=False)
    assert len(fake_conversion) == 2 and not model.training
    load_causal_lm(path, cache_dir=cache, progress=False)
    assert len(fake_conversion) == 2  # repaired
