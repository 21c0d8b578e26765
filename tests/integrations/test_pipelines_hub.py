"""The head comes from the revision the model was loaded from, with the caller's token: a local,
offline Hub cache with two revisions of one repository, each with its own ``sdm_head/``."""

import shutil

import huggingface_hub
import pytest
from transformers import pipeline

import sdm_hf  # noqa: F401  (registers the tasks)
import sdm_hf.head.hub as head_hub
from tests.helpers import build_encoder_repo

REPO = "someone/tiny-sdm"
MAIN, V1 = "a" * 40, "b" * 40


def _add_snapshot(cache, repo_id, commit, folder, refs):
    root = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A Hub cache where REPO's main holds a head labelled neg/pos and its v1 one labelled
    NEG/POS (same model), and someone/heads holds a bare head at its root."""
    base = tmp_path_factory.mktemp("hub")
    repo_main, _, texts = build_encoder_repo(base / "main")
    repo_v1, _, _ = build_encoder_repo(base / "v1", id2label={0: "NEG", 1: "POS"})
    cache = base / "cache"
    _add_snapshot(cache, REPO, MAIN, repo_main, ["main"])
    _add_snapshot(cache, REPO, V1, repo_v1, ["v1"])
    _add_snapshot(cache, "someone/heads", "c" * 40, repo_v1 / "sdm_head", ["main"])
    return cache, texts


@pytest.fixture
def fetches(monkeypatch):
    """Every head file download's arguments (the download itself still runs, from the cache)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # nothing may reach the network
    seen = []
    real = head_hub.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        seen.append({"repo_id": repo_id, "filename": filename, **kwargs})
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(head_hub, "hf_hub_download", spy)
    return seen


def _labels(clf, texts):
    return {r["label"] for r in clf(texts[:10])}


def test_the_head_comes_from_the_models_revision_with_the_callers_token(hub_cache, fetches):
    cache, texts = hub_cache
    kwargs = {"model_kwargs": {"cache_dir": str(cache)}, "device": "cpu"}
    default = pipeline("sdm-text-classification", model=REPO, **kwargs)
    assert _labels(default, texts) <= {"neg", "pos"}
    assert fetches and all(f["subfolder"] == "sdm_head" for f in fetches)
    fetches.clear()
    pinned = pipeline("sdm-text-classification", model=REPO, revision="v1", token="hf_caller", **kwargs)
    assert _labels(pinned, texts) <= {"NEG", "POS"}
    assert {f["revision"] for f in fetches} == {"v1"} and {f["token"] for f in fetches} == {"hf_caller"}
    assert {f["cache_dir"] for f in fetches} == {str(cache)}
    by_commit = pipeline("sdm-text-classification", model=REPO, revision=V1, **kwargs)
    assert _labels(by_commit, texts) <= {"NEG", "POS"}


def test_explicit_head_options_and_local_files_only(hub_cache, fetches):
    cache, texts = hub_cache
    kwargs = {"model_kwargs": {"cache_dir": str(cache)}, "device": "cpu"}
    explicit = pipeline(
        "sdm-text-classification", model=REPO, revision="v1", sdm_head_kwargs={"revision": "main"}, **kwargs
    )
    assert _labels(explicit, texts) <= {"neg", "pos"}  # sdm_head_kwargs win
    fetches.clear()
    offline = pipeline("sdm-text-classification", model=REPO, local_files_only=True, **kwargs)
    assert {f["local_files_only"] for f in fetches} == {True}
    assert _labels(offline, texts) <= {"neg", "pos"}
    with pytest.raises(ValueError, match=r"unknown sdm_head_kwargs \['subfolder'\]; valid keys"):
        pipeline("sdm-text-classification", model=REPO, sdm_head_kwargs={"subfolder": "x"}, **kwargs)


def test_a_head_from_another_repository_takes_the_token_not_the_revision(hub_cache, fetches):
    cache, texts = hub_cache
    clf = pipeline(
        "sdm-text-classification",
        model=REPO,
        revision="v1",
        token="hf_caller",
        sdm_head="someone/heads",
        model_kwargs={"cache_dir": str(cache)},
        device="cpu",
    )
    assert _labels(clf, texts) <= {"NEG", "POS"}
    assert {f["repo_id"] for f in fetches} == {"someone/heads"}
    assert {f["revision"] for f in fetches} == {None} and {f["token"] for f in fetches} == {"hf_caller"}


def test_constructed_directly_the_pipeline_uses_its_arguments_only(hub_cache, fetches):
    from transformers import AutoModel, AutoTokenizer

    from sdm_hf.integrations.pipelines import SDMTextClassificationPipeline

    cache, texts = hub_cache
    model = AutoModel.from_pretrained(REPO, revision="v1", cache_dir=str(cache))
    tokenizer = AutoTokenizer.from_pretrained(REPO, revision="v1", cache_dir=str(cache))
    clf = SDMTextClassificationPipeline(
        model=model, tokenizer=tokenizer, device="cpu", sdm_head_kwargs={"revision": "v1", "cache_dir": str(cache)}
    )
    assert _labels(clf, texts) <= {"NEG", "POS"}
    with pytest.raises(TypeError, match="sdm_head must be an SDMHead, a folder or a Hub repo id"):
        SDMTextClassificationPipeline(model=model, tokenizer=tokenizer, sdm_head=3)
