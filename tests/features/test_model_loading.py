"""The causal-LM loader (GGUF conversion cached) on tiny models built here, and how the features
of the models it loads are keyed."""

import copy
import hashlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from sdm_hf.features import model_loading
from sdm_hf.features.cache import cached_features
from sdm_hf.features.model_loading import load_causal_lm
from tests.helpers import TEXTS, Counter

pytestmark = pytest.mark.usefixtures("private_cache")  # nothing a test does lands in the user's cache


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

    monkeypatch.setattr(model_loading, "_read_gguf", read)
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


def test_half_written_or_broken_copies_are_not_trusted(tmp_path, fake_conversion, caplog):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"c" * 100)
    cache = tmp_path / "cache"
    folder = cache / "models" / hashlib.sha256(path.read_bytes()).hexdigest()
    folder.mkdir(parents=True)  # a crashed writer's folder: files but no marker
    (folder / "config.json").write_text("{}")
    load_causal_lm(path, cache_dir=cache, progress=False)
    assert len(fake_conversion) == 1 and (folder / "sdm_hf_converted.json").is_file()

    (folder / "model.safetensors").write_bytes(b"junk")  # complete marker, broken weights
    with caplog.at_level(logging.WARNING, logger="sdm_hf.features.model_loading"):
        model, _ = load_causal_lm(path, cache_dir=cache, progress=False)
    assert any("could not be loaded" in r.getMessage() for r in caplog.records)
    assert len(fake_conversion) == 2 and not model.training
    load_causal_lm(path, cache_dir=cache, progress=False)
    assert len(fake_conversion) == 2  # repaired
