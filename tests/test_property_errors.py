"""Property tests: random bad inputs to the public entry points fail with ValueError /
TypeError / SDMFormatError / FileNotFoundError whose message names the argument or the file,
never with an error from inside numpy, torch or FAISS."""

import math
import os
import warnings
from dataclasses import fields

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdm_hf import SDMConfig, SDMHead, fit_sdm_head
from sdm_hf.head.serialization import SDMFormatError

ALLOWED = (ValueError, TypeError, SDMFormatError, FileNotFoundError)
QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**62), max_value=2**62),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _names_one_of(err: BaseException, names) -> bool:
    text = str(err)
    return any(name in text for name in names)


# -- SDMConfig -----------------------------------------------------------------------------
CONFIG_FIELDS = [f.name for f in fields(SDMConfig) if f.name != "input_dim"]


@QUICK
@given(name=st.sampled_from(CONFIG_FIELDS), value=junk)
def test_config_fields(name, value):
    try:
        cfg = SDMConfig(input_dim=4, **{name: value})
    except ALLOWED as err:
        assert _names_one_of(err, [name, name.removesuffix("s")]), (name, value, err)
        return
    assert SDMConfig.from_dict(cfg.to_dict()) == cfg  # what validates also round-trips
    try:
        setattr(SDMConfig(input_dim=4), name, value)  # assignment: the same verdict
    except ALLOWED as err:  # pragma: no cover - accepted above, so accepted here too
        raise AssertionError(f"{name}={value!r} accepted by the constructor, refused on assignment: {err}") from err


# -- fit_sdm_head -------------------------------------------------------------------------
def _good(n=40, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long()


bad_features = st.one_of(
    junk,
    st.just(torch.zeros(40)),  # 1-D
    st.just(torch.zeros(40, 3, 2)),  # 3-D
    st.just(torch.zeros(40, 0)),  # no columns
    st.just(torch.full((40, 3), float("nan"))),
    st.just(torch.full((40, 3), float("inf"))),
    st.just(np.array([["a", "b", "c"]] * 40)),
    st.just([[1.0, 2.0, 3.0]] * 39 + [[1.0]]),  # ragged
    st.just(torch.zeros(39, 3)),  # wrong length
)
bad_labels = st.one_of(
    junk,
    st.just(torch.full((40,), -2)),
    st.just(torch.full((40,), 2**40)),
    st.just(torch.rand(40)),
    st.just(np.array(["pos", "neg"] * 20, dtype=object)),
    st.just(torch.zeros(39, dtype=torch.long)),
    st.just(torch.zeros(40, 2, dtype=torch.long)),
)
ARGS = ["train_x", "train_y", "calib_x", "calib_y"]


@QUICK
@given(which=st.sampled_from(ARGS), features=bad_features, labels=bad_labels)
def test_fit_sdm_head_inputs(which, features, labels):
    x, y = _good()
    args = {"train_x": x, "train_y": y, "calib_x": x.clone(), "calib_y": y.clone()}
    args[which] = features if which.endswith("_x") else labels
    with pytest.raises(ALLOWED) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit_sdm_head(**args, procedure="fast", epochs=1, shuffles=1, progress=False)
    assert _names_one_of(info.value, [which, "x", "y", "label", "feature"]), info.value


@QUICK
@given(
    name=st.sampled_from(
        ["procedure", "epochs", "shuffles", "batch_size", "learning_rate", "seed", "patience", "selection_fraction",
         "holdout_fraction", "candidates", "device", "resplit"]
    ),
    value=junk,
)  # fmt: skip
def test_fit_sdm_head_options(name, value):
    x, y = _good()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = {"epochs": 1, name: value}
            fit_sdm_head(x, y, x.clone(), y.clone(), **options, progress=False)
    except ALLOWED as err:
        assert _names_one_of(err, [name, name.replace("_", " ")]), (name, value, err)


# -- a fitted head -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def head():
    x, y = _good(200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fit_sdm_head(x[:100], y[:100], x[100:], y[100:], procedure="fast", epochs=2, shuffles=1, progress=False)


bad_query = st.one_of(
    junk,
    st.just(torch.zeros(40)),
    st.just(torch.zeros(40, 3, 2)),
    st.just(torch.zeros(40, 4)),
    st.just(torch.full((5, 3), float("nan"))),
    st.just(np.array([["a", "b", "c"]] * 4)),
    st.just([[1.0, 2.0, 3.0], [1.0]]),
)


@QUICK
@given(x=bad_query, batch_size=st.one_of(st.just(8192), junk))
def test_predict(head, x, batch_size):  # any bad x, or a bad batch_size with a bad x
    with pytest.raises(ALLOWED) as info:
        head.predict(x, batch_size=batch_size)
    assert _names_one_of(info.value, ["x", "batch_size", "feature", "input_dim"]), info.value


@QUICK
@given(alpha=junk, points=junk)
def test_recalibrate(head, alpha, points):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            head.recalibrate(alpha=alpha, min_class_points=points)
    except ALLOWED as err:
        assert _names_one_of(err, ["alpha", "min_class_points"]), err
    finally:
        head.recalibrate(alpha=0.9, min_class_points=0)


@QUICK
@given(name=st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s))
def test_from_pretrained_names(tmp_path_factory, name, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path_factory.getbasetemp())
    with pytest.raises(ALLOWED + (OSError,)) as info:
        SDMHead.from_pretrained(name)
    assert isinstance(info.value, ALLOWED), info.value
    named = (name, repr(name), os.path.abspath(os.path.expanduser(name)))
    assert any(n in str(info.value) for n in named), info.value


def test_nan_alpha_names_alpha():
    with pytest.raises(ValueError, match="alpha"):
        SDMConfig(input_dim=2, alpha=math.nan)
