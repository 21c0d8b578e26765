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


# -- assignment after construction ---------------------------------------------------------
def test_assigning_a_field_is_validated_like_the_constructor():
    cfg = SDMConfig(input_dim=4)
    cfg.alpha = 0.9  # a config of no head: any valid value
    cfg.alphas = (0.99, 0.8)
    assert cfg.alpha == 0.9 and cfg.alphas == [0.8, 0.99]  # normalised as the constructor does
    for name, bad, error in (
        ("alphas", [0.3], ValueError),
        ("alpha", 2.0, ValueError),
        ("min_class_points", -1, ValueError),
        ("id2label", {0: "a"}, ValueError),
        ("normalization", "l2", ValueError),
        ("input_dim", "4", TypeError),
    ):
        before = cfg.to_dict()
        with pytest.raises(error, match=name if name != "input_dim" else "input_dim"):
            setattr(cfg, name, bad)
        assert cfg.to_dict() == before  # unchanged
    with pytest.raises(AttributeError, match="no field 'alpah'"):
        cfg.alpah = 0.9


def test_a_heads_config_refuses_what_its_weights_support_and_region_depend_on(small_head, tmp_path):
    import dataclasses

    from sdm_hf import SDMHead

    head, x, _ = small_head
    for name, value, hint in (
        ("alpha", 0.9, "recalibrate"),
        ("min_class_points", 10**6, "recalibrate"),
        ("input_dim", 9, "build a new head"),
        ("num_classes", 3, "build a new head"),
        ("max_q", 10, "support set"),
    ):
        with pytest.raises(ValueError, match=hint):
            setattr(head.config, name, value)
    before = head.config.to_dict()
    for name, value, hint in (("input_dim", 9, "weights"), ("exemplar_dim", 4, "weights"), ("max_q", 10, "support")):
        with pytest.raises(ValueError, match=f"changes {name}: .*{hint}"):
            head.config = dataclasses.replace(head.config, **{name: value})
    assert head.config.to_dict() == before
    with pytest.raises(ValueError, match="alphas: every tier must satisfy 0.5 < alpha <= 1, got 0.3"):
        head.config.alphas = [0.3]
    head.config.alphas = [0.8]  # descriptive fields stay assignable, validated
    head.config.alphas.append(0.3)  # changed in place: caught before anything is written
    with pytest.raises(ValueError, match="no longer validates"):
        head.save_pretrained(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    head.config.alphas = [0.8]
    head.config.id2label = {0: "neg", 1: "pos"}
    # a whole new config with another guard: the region is recomputed at once, so it saves and loads
    with pytest.warns(UserWarning, match="small-region guard"):
        head.config = dataclasses.replace(head.config, min_class_points=10**6)
    assert head.q_min == float("inf") and not bool(head.predict(x).in_hr.any())
    head.save_pretrained(tmp_path / "h")
    loaded = SDMHead.from_pretrained(tmp_path / "h")
    assert loaded.config == head.config and loaded.q_min == float("inf")


def test_a_head_keeps_its_own_copy_of_the_config(small_head):
    from sdm_hf import SDMHead

    cfg = SDMConfig(input_dim=2, exemplar_dim=8)
    head = SDMHead(cfg)
    cfg.alpha = 0.8  # the caller's object stays theirs and mutable
    assert head.config.alpha == 0.95 and head.config is not cfg
