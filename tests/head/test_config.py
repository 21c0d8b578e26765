import dataclasses
import json

import pytest

from sdm_hf import SDMConfig


def test_config_roundtrip_and_validation():
    cfg = SDMConfig(input_dim=4, num_classes=3, id2label={"0": "a", "1": "b", "2": "c"})
    assert cfg.id2label == {0: "a", 1: "b", 2: "c"} and cfg.label2id == {"a": 0, "b": 1, "c": 2}
    assert SDMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="alpha"):
        SDMConfig(input_dim=4, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        SDMConfig(input_dim=4, alpha=1.01)
    with pytest.raises(ValueError, match="num_classes"):
        SDMConfig(input_dim=4, num_classes=1)
    with pytest.raises(ValueError, match="id2label"):
        SDMConfig(input_dim=4, num_classes=3, id2label={0: "a"})
    with pytest.raises(ValueError, match="unknown SDMConfig"):
        SDMConfig.from_dict({"input_dim": 4, "bogus": 1})


def test_every_field_has_help_and_label_names_fall_back_to_numbers():
    for f in dataclasses.fields(SDMConfig):
        assert f.metadata.get("help"), f.name
    assert SDMConfig(input_dim=4, num_classes=3).label_name(2) == "2"
    assert SDMConfig(input_dim=4, id2label={0: "no", 1: "yes"}).label_name(1) == "yes"
