import base64
import json
import warnings
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http
from transformers import AutoModel, BertModel

from sdm_hf import SDMConfig, SDMHead
from sdm_hf.repository import load_sdm_model, push_sdm_model, save_sdm_model
from tests.helpers import gaussian_mixture, tiny_bert


def tiny_head(input_dim=16, pooling="mean", base_model=None):
    x, y = gaussian_mixture(120, 2, input_dim, separation=3.0, seed=0)
    head = SDMHead(
        SDMConfig(input_dim=input_dim, exemplar_dim=8, alpha=0.9, feature_pooling=pooling, base_model=base_model),
        generator=torch.Generator().manual_seed(0),
    )
    head.build_support(x[:60], y[:60])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained head may have an empty HR region
        head.calibrate(x[60:], y[60:])
    return head, x


def test_model_and_head_saved_side_by_side(tmp_path):
    model, (head, x) = tiny_bert()[0], tiny_head()
    save_sdm_model(model, head, tmp_path / "repo")
    root = tmp_path / "repo"
    assert (root / "config.json").is_file() and (root / "model.safetensors").is_file()
    assert json.loads((root / "config.json").read_text())["model_type"] == "bert"  # model's config untouched
    assert sorted(p.name for p in (root / "sdm_head").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert "library_name: transformers" in (root / "README.md").read_text()  # the Hub loads the root with transformers
    assert "library_name: sdm_hf" in (root / "sdm_head" / "README.md").read_text()
    reloaded = AutoModel.from_pretrained(root)
    assert isinstance(reloaded, BertModel)
    loaded = SDMHead.from_pretrained(root, subfolder="sdm_head")
    assert torch.equal(loaded.predict(x).probabilities, head.predict(x).probabilities)
    model2, head2 = load_sdm_model(root)
    assert isinstance(model2, BertModel) and head2.config.input_dim == 16


def test_mismatched_pairing(tmp_path):
    model = tiny_bert()[0]
    head, _ = tiny_head(input_dim=16, pooling="mean_last")  # mean_last would need 32 dims
    with pytest.raises(ValueError, match="32"):
        save_sdm_model(model, head, tmp_path / "a")
    good, _ = tiny_head(input_dim=16, base_model="someone/other-model")
    model.config._name_or_path = "someone/tiny-bert"
    with pytest.warns(UserWarning, match="fitted on features of 'someone/other-model' but is paired with"):
        save_sdm_model(model, good, tmp_path / "b")  # where the mismatch shows: the model is named
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the repository's own head was paired (and checked) when saved
        _, loaded = load_sdm_model(tmp_path / "b")
    with pytest.warns(UserWarning, match="other-model"):  # a head from elsewhere is checked by name
        load_sdm_model(tmp_path / "b", sdm_head=loaded)
    with pytest.raises(ValueError, match="subfolder"):
        save_sdm_model(model, good, tmp_path / "c", subfolder="../escape")


class FakeHub:
    """Answers huggingface_hub's HTTP calls for create_repo + upload_folder and records the
    commit it would make."""

    def __init__(self, fail_with=None):
        self.fail_with = fail_with
        self.commits = []
        self.calls = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.calls.append((request.method, path))
        if self.fail_with:
            return httpx.Response(self.fail_with, json={"error": "Invalid credentials"}, request=request)
        if path == "/api/repos/create":
            name = json.loads(request.content)["name"]
            return httpx.Response(200, json={"url": f"https://huggingface.co/user/{name}", "name": f"user/{name}"})
        if path == "/api/validate-yaml":
            return httpx.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines()]
            self.commits.append(lines)
            return httpx.Response(
                200,
                json={
                    "commitUrl": "https://huggingface.co/user/repo/commit/abc",
                    "commitOid": "abc",
                    "pullRequestUrl": None,
                },
            )
        return httpx.Response(404, json={"error": f"not mocked: {path}"}, request=request)


@pytest.fixture
def fake_hub(monkeypatch):
    hubs = []

    def install(fail_with=None):
        hub = FakeHub(fail_with)
        hubs.append(hub)
        _http.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(hub)))
        _http.close_session()
        return hub

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield install
    _http.set_client_factory(_http.default_client_factory)
    _http.close_session()


def _uploaded(commit):
    files = {}
    for line in commit:
        if line.get("key") == "file":
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
    return files


def test_push_head_to_subfolder(fake_hub, tmp_path):
    hub = fake_hub()
    head, x = tiny_head()
    url = head.push_to_hub("user/repo", subfolder="sdm_head", token="hf_fake")
    assert url.endswith("/commit/abc")
    files = _uploaded(hub.commits[0])
    assert sorted(files) == ["sdm_head/README.md", "sdm_head/config.json", "sdm_head/model.safetensors"]
    # what would be uploaded loads back to the same head
    for name, content in files.items():
        (tmp_path / Path(name).name).write_bytes(content)
    loaded = SDMHead.from_pretrained(tmp_path)
    assert torch.equal(loaded.predict(x).probabilities, head.predict(x).probabilities)


def test_push_model_with_head(fake_hub):
    hub = fake_hub()
    model, (head, _) = tiny_bert()[0], tiny_head()
    push_sdm_model(model, head, "user/repo", token="hf_fake")
    files = sorted(_uploaded(hub.commits[0]))
    assert files == [
        "README.md",
        "config.json",
        "model.safetensors",
        "sdm_head/README.md",
        "sdm_head/config.json",
        "sdm_head/model.safetensors",
    ]


def test_push_without_credentials_gives_hint(fake_hub, tmp_path, monkeypatch):
    fake_hub(fail_with=401)
    head, _ = tiny_head()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HfHubHTTPError, match="hf auth login"):
        head.push_to_hub("user/repo", token="hf_bad")
    assert list(tmp_path.iterdir()) == []  # nothing half-written locally


def test_peft_adapter_repository(tmp_path):
    peft = pytest.importorskip("peft")
    base = tiny_bert()[0]
    base.save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(
        BertModel.from_pretrained(tmp_path / "base"), peft.LoraConfig(r=2, target_modules=["query", "value"])
    )
    head, x = tiny_head(base_model=str(tmp_path / "base"))
    save_sdm_model(model, head, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "sdm_head" / "config.json").is_file()
    reloaded = peft.PeftModel.from_pretrained(BertModel.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    loaded = SDMHead.from_pretrained(tmp_path / "adapter", subfolder="sdm_head")
    assert torch.equal(loaded.predict(x).probabilities, head.predict(x).probabilities)
    assert reloaded.peft_config["default"].r == 2


def test_missing_hub_head_names_the_file():
    with pytest.raises(FileNotFoundError, match="sdm_head/config.json.*not a local folder"):
        SDMHead.from_pretrained("nobody/no-such-repo", subfolder="sdm_head", local_files_only=True)


def test_a_failed_write_creates_nothing_on_the_hub(monkeypatch):
    from sdm_hf.head import hub as head_hub

    calls = []

    class Api:
        def __init__(self, token=None):
            pass

        def create_repo(self, **kwargs):
            calls.append("create_repo")

        def upload_folder(self, **kwargs):
            calls.append("upload_folder")

    def write(folder):
        raise ValueError("the model could not be saved")

    monkeypatch.setattr(head_hub, "HfApi", Api)
    with pytest.raises(ValueError, match="could not be saved"):
        head_hub.upload_folder(write, "me/repo", commit_message="x")
    assert calls == []


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records create_repo / upload_folder and what the
    uploaded folder held (read during the call, before the temporary folder is removed)."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", {"token": token}))

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return type("Repo", (), {"repo_id": kwargs["repo_id"]})()

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", kwargs | {"files": files}))
        return type("Info", (), {"commit_url": "https://huggingface.co/me/repo/commit/1"})()


@pytest.fixture
def recording_api(monkeypatch):
    from sdm_hf.head import hub as head_hub

    RecordingApi.calls = []
    monkeypatch.setattr(head_hub, "HfApi", RecordingApi)
    return RecordingApi.calls


PUSH_ARGS = {
    "private": True,
    "branch": "dev",
    "create_pr": True,
    "allow_patterns": ["*.json", "*.md", "*.safetensors"],
    "ignore_patterns": "*.tmp",
    "delete_patterns": ["old/*"],
}


def _call(calls, name):
    return next(kwargs for what, kwargs in calls if what == name)


def test_head_push_forwards_the_hub_mixin_arguments(recording_api):
    head, _ = tiny_head()
    url = head.push_to_hub(
        "me/repo",
        subfolder="sdm_head",
        commit_message="hi",
        token="hf_fake",
        model_card_kwargs={"license": "mit", "tags": ["demo"], "language": "en"},
        **PUSH_ARGS,
    )
    assert url.endswith("/commit/1")
    assert _call(recording_api, "init") == {"token": "hf_fake"}
    assert _call(recording_api, "create_repo") == {"repo_id": "me/repo", "private": True, "exist_ok": True}
    upload = _call(recording_api, "upload_folder")
    assert upload["path_in_repo"] == "sdm_head" and upload["commit_message"] == "hi"
    assert upload["revision"] == "dev" and upload["create_pr"] is True
    for key in ("allow_patterns", "ignore_patterns", "delete_patterns"):
        assert upload[key] == PUSH_ARGS[key], key
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.license == "mit" and card.data.language == "en" and "demo" in card.data.tags
    assert "sdm" in card.data.tags
    assert 'SDMHead.from_pretrained("me/repo", subfolder="sdm_head")' in card.text  # names where it was pushed


def test_save_pretrained_then_push_forwards_the_same(recording_api, tmp_path):
    head, _ = tiny_head()
    head.save_pretrained(
        tmp_path / "h", push_to_hub=True, repo_id="me/h", model_card_kwargs={"license": "mit"}, **PUSH_ARGS
    )
    assert ModelCard.load(tmp_path / "h" / "README.md").data.license == "mit"
    upload = _call(recording_api, "upload_folder")
    assert upload["repo_id"] == "me/h" and upload["delete_patterns"] == ["old/*"] and upload["revision"] == "dev"
    assert ModelCard(upload["files"]["README.md"].decode()).data.license == "mit"
    with pytest.raises(ValueError, match="SDMConfig"):
        head.push_to_hub("me/h", config={"alpha": 0.5})
    with pytest.raises(ValueError, match="SDMConfig"):
        head.save_pretrained(tmp_path / "h2", config={"alpha": 0.5})


def test_push_sdm_model_forwards_the_hub_mixin_arguments(recording_api):
    model, (head, _) = tiny_bert()[0], tiny_head()
    push_sdm_model(
        model,
        head,
        "me/model",
        token="hf_fake",
        license="apache-2.0",
        model_card_kwargs={"tags": ["demo"]},
        **PUSH_ARGS,
    )
    assert _call(recording_api, "create_repo")["private"] is True
    upload = _call(recording_api, "upload_folder")
    assert upload["path_in_repo"] is None and upload["create_pr"] is True and upload["revision"] == "dev"
    for key in ("allow_patterns", "ignore_patterns", "delete_patterns"):
        assert upload[key] == PUSH_ARGS[key], key
    root = ModelCard(upload["files"]["README.md"].decode())
    assert root.data.license == "apache-2.0" and root.data.tags[-1] == "demo" and "sdm" in root.data.tags
    assert 'load_sdm_model("me/model")' in root.text and root.data.model_name == "model"
    head_card = ModelCard(upload["files"]["sdm_head/README.md"].decode())
    assert head_card.data.license == "apache-2.0"
    assert 'SDMHead.from_pretrained("me/model", subfolder="sdm_head")' in head_card.text


def test_push_patterns_filter_what_is_committed(fake_hub):
    hub = fake_hub()
    model, (head, _) = tiny_bert()[0], tiny_head()
    push_sdm_model(model, head, "user/repo", token="hf_fake", allow_patterns=["sdm_head/*"], ignore_patterns="*.md")
    assert sorted(_uploaded(hub.commits[0])) == ["sdm_head/config.json", "sdm_head/model.safetensors"]
    head.push_to_hub("user/repo", token="hf_fake", ignore_patterns=["README.md"])
    assert sorted(_uploaded(hub.commits[1])) == ["config.json", "model.safetensors"]
