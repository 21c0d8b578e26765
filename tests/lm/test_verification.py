"""sdm_hf.lm.verification.fit_split_head: the seeded halves and the support-row map."""

import logging

import pytest
import torch

from sdm_hf.lm.verification import fit_split_head
from tests.helpers import make_args


def features(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    return torch.randn(n, 6, generator=g) + 2.0 * labels.view(-1, 1), labels


def test_support_rows_map_the_training_half_only(tmp_path):
    feats, labels = features(24)
    ids = torch.arange(24) * 2  # ids need not be contiguous
    args = make_args(tmp_path)
    head, support_row = fit_split_head(feats, labels, ids, args, seed=4, base_model="tiny")
    again, same_rows = fit_split_head(feats, labels, ids, args, seed=4)
    assert torch.equal(support_row, same_rows)  # the split is seeded
    assert support_row.numel() == 47 and sorted(support_row[support_row >= 0].tolist()) == list(range(12))
    assert (support_row[1::2] == -1).all()  # odd ids are no document
    assert head.support.ntotal == 12 and head.config.base_model == "tiny" and head.config.num_classes == 2
    torch.testing.assert_close(head.adaptor.weight, again.adaptor.weight)


def test_too_few_of_a_class_gives_no_head(tmp_path, caplog):
    feats, _ = features(8)
    labels = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0])
    with caplog.at_level(logging.WARNING, logger="sdm_hf.lm.verification"):
        head, support_row = fit_split_head(feats, labels, torch.arange(8), make_args(tmp_path), seed=0)
    assert head is None and (support_row == -1).all()
    assert any("beta = e" in r.getMessage() for r in caplog.records)


def test_head_procedure_sets_every_fit_and_explicit_values_win(tmp_path):
    from sdm_hf.training.fit import PROCEDURES

    feats, labels = features(40)
    ids = torch.arange(40)
    fast = make_args(tmp_path, head_procedure="fast", head_epochs=None, head_learning_rate=None)
    settings = fast.head_fit_settings()
    assert settings == {
        "procedure": "fast",
        "epochs": PROCEDURES["fast"]["epochs"],
        "shuffles": 1,
        "batch_size": 50,
        "learning_rate": PROCEDURES["fast"]["learning_rate"],
        "patience": PROCEDURES["fast"]["patience"],
    }
    head, _ = fit_split_head(feats, labels, ids, fast, seed=1)
    assert head.selection["procedure"] == "fast"
    assert head.selection["settings"]["learning_rate"] == PROCEDURES["fast"]["learning_rate"]
    # 'auto' is the default: at most 100 epochs at 1e-3, early-stopped on held-out training rows
    default = make_args(tmp_path, head_epochs=None, head_learning_rate=None).head_fit_settings()
    assert (default["procedure"], default["epochs"], default["learning_rate"], default["patience"]) == (
        "auto",
        100,
        1e-3,
        10,
    )
    head, _ = fit_split_head(feats, labels, ids, make_args(tmp_path, head_epochs=None, head_learning_rate=None), seed=1)
    assert head.selection["procedure"] == "auto" and head.selection["chosen"]["normalization"] in ("scalar", "feature")
    # too few of a class in the training half to hold rows out: that fit uses 'fast'
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))  # fit_split_head's own split
    few = torch.ones(40, dtype=torch.long)
    few[perm[:3]] = 0  # 3 negatives in the training half
    few[perm[20:23]] = 0  # and 3 in the calibration half
    head, _ = fit_split_head(feats, few, ids, make_args(tmp_path, head_epochs=None, head_learning_rate=None), seed=2)
    assert head.selection["procedure"] == "fast"
    explicit = make_args(tmp_path, head_procedure="fast", head_epochs=3, head_learning_rate=1e-2)
    assert explicit.head_fit_settings()["epochs"] == 3 and explicit.head_fit_settings()["learning_rate"] == 1e-2
    with pytest.raises(ValueError, match="head_procedure must be one of"):
        make_args(tmp_path, head_procedure="slow")
    with pytest.raises(ValueError, match="head_learning_rate must be > 0"):
        make_args(tmp_path, head_learning_rate=-1.0)
