import copy

import pytest

from tests.helpers import gaussian_mixture


@pytest.fixture(autouse=True)
def _sdm_hf_records_reach_caplog():
    """sdm_hf's library logger does not propagate (transformers' convention); in tests it does, so
    pytest's ``caplog`` sees its records."""
    from sdm_hf.utils.logging import disable_propagation, enable_propagation, get_verbosity, set_verbosity

    level = get_verbosity()
    enable_propagation()
    yield
    disable_propagation()
    set_verbosity(level)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """Point sdm_hf's cache ($SDM_HF_CACHE) at a temporary folder: nothing lands in the user's."""
    monkeypatch.setenv("SDM_HF_CACHE", str(tmp_path / "default-cache"))
    return tmp_path / "default-cache"


@pytest.fixture
def mixture():
    return gaussian_mixture


@pytest.fixture(scope="session")
def _fitted_small_head():
    # fitted once per session; tests get copies through small_head
    from sdm_hf import SDMConfig, fit_sdm_head

    x, y = gaussian_mixture(600, num_classes=2, dim=8, separation=1.5, label_noise=0.02, seed=3)
    config = SDMConfig(input_dim=8, num_classes=2, exemplar_dim=32, alpha=0.9, id2label={0: "neg", 1: "pos"})
    head = fit_sdm_head(
        x[:300],
        y[:300],
        x[300:],
        y[300:],
        config,
        procedure="paper",  # a fixed, quick fit (these tests are about the head, not the procedure)
        epochs=30,
        shuffles=1,
        learning_rate=3e-3,
        resplit=False,
        progress=False,
    )
    return head, x, y


@pytest.fixture
def small_head(_fitted_small_head):
    """``(head, x, y)``: a quickly fitted 2-class head on a Gaussian mixture (600 points, the
    first 300 its support set, the rest its calibration set). A fresh copy for every test."""
    head, x, y = _fitted_small_head
    return copy.deepcopy(head), x.clone(), y.clone()


@pytest.fixture(scope="session")
def _tiny_decoder():
    # built once per session (training the tokenizer is the slow part); tests get copies
    from tests.helpers import tiny_causal_lm, tiny_tokenizer

    tokenizer = tiny_tokenizer(chat_template=False)
    model = tiny_causal_lm(tokenizer, num_hidden_layers=3, num_key_value_heads=1, max_position_embeddings=64)
    return tokenizer, model


@pytest.fixture
def bpe(_tiny_decoder):
    """A tiny byte-level BPE tokenizer without a chat template (decoder-LM feature tests); a fresh copy."""
    return copy.deepcopy(_tiny_decoder[0])


@pytest.fixture
def llama(_tiny_decoder):
    """A 3-layer, 16-wide Llama for ``bpe`` (intermediate layers exist for the early-stop path); a fresh copy."""
    return copy.deepcopy(_tiny_decoder[1])
