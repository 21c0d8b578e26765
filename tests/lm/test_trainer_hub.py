"""SDMTrainer on the Hub and across checkpoints: the merged SDM model card, the best
checkpoint's head restored with its weights, mid-training and final pushes that carry the
head and no training text (Hub calls mocked: nothing touches the network), and the SDM state
file (text-free references; the former name still resumes)."""

import json
import shutil
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from sdm_hf import SDMHead
from sdm_hf.head.model_card import SECTION_END, SECTION_START
from sdm_hf.lm.data import prepare_documents
from sdm_hf.lm.state import STATE_NAME, SDMEpochState
from tests.helpers import harvard_sentences, make_trainer, preference

SENTENCES = harvard_sentences(48)
TRAIN, CALIBRATION = SENTENCES[:32], SENTENCES[32:]


def training_texts(sentences):
    """Every text of the preference rows: the chosen sentences and the reversed (rejected) ones."""
    return [s for s in sentences] + [" ".join(reversed(s.split())) for s in sentences]


# -- the model card ---------------------------------------------------------------------------
def test_card_keeps_transformers_metadata_and_adds_the_sdm_part(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.create_model_card(finetuned_from="org/tiny-llama", model_name="tiny-sdm", license="apache-2.0")
    path = Path(trainer.args.output_dir) / "README.md"
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers" and card.data.base_model == "org/tiny-llama"
    assert card.data.license == "apache-2.0"
    tags = card.data.tags
    assert "generated_from_trainer" in tags  # transformers' own tag is kept
    assert {"sdm", "sdm-language-model", "selective-classification", "uncertainty-quantification"} <= set(tags)
    metrics = {r.metric_type for r in card.data.eval_results or []}
    assert {"coverage", "accuracy"} & metrics  # the head's calibration as Hub evaluation results
    text = card.text
    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    section = text.split(SECTION_START)[1].split(SECTION_END)[0]
    assert "## SDM language model" in section and "## SDM head" in section
    assert "Base model: `org/tiny-llama`" in section
    assert 'pipeline("sdm-verify"' in section and "load_sdm_model" not in section  # how an LM head is used
    assert "high-reliability" in section and f"alpha = {trainer.args.alpha}" in section
    for column in ("`prompt`", "`chosen`", "`rejected`", "`completion`", "`label`"):
        assert column in section
    for setting in ("gamma_pos", "gamma_gen", "gamma_diversity", "head_exemplar_dim", "verification_pooling"):
        assert f"| `{setting}` |" in section
    assert f"Training documents: {len(TRAIN)}; calibration documents: {len(CALIBRATION)}" in section
    assert "training hyperparameters" in text.lower()  # transformers' body stays
    trainer.create_model_card(finetuned_from="org/tiny-llama")  # again: replaced, never duplicated
    again = ModelCard.load(path)
    assert again.text.count(SECTION_START) == 1 and set(tags) <= set(again.data.tags)


def test_card_without_a_head_says_so(tmp_path):
    trainer = make_trainer(tmp_path, eval_data=False, use_sdm_loss=False)
    assert trainer.head is None
    trainer.create_model_card()
    card = ModelCard.load(Path(trainer.args.output_dir) / "README.md")
    assert {"sdm", "sdm-language-model", "generated_from_trainer"} <= set(card.data.tags)
    assert "selective-classification" not in card.data.tags
    assert "No verification head" in card.text and "## SDM head" not in card.text
    assert card.text.count(SECTION_START) == 1


# -- the best checkpoint -----------------------------------------------------------------------
def head_tensors(head: SDMHead) -> dict[str, torch.Tensor]:
    state = head.to_state()
    assert state.support is not None and state.calibration is not None
    out = {f"weights.{k}": v for k, v in state.weights.items()}
    out["support.vectors"] = state.support.vectors
    out["calibration.thresholds"] = state.calibration.thresholds
    return out


def test_best_model_at_end_restores_the_head_of_the_best_checkpoint(tmp_path):
    # learning_rate 0: every evaluation gives the same eval_loss, so the first checkpoint stays the
    # best (ties keep it) while each epoch refits a different head
    trainer = make_trainer(
        tmp_path,
        train=TRAIN[:16],
        num_train_epochs=3,
        learning_rate=0.0,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer.train()
    out = Path(trainer.args.output_dir)
    best, last = Path(trainer.state.best_model_checkpoint), out / "checkpoint-6"
    assert best.name == "checkpoint-2" and last.is_dir()
    saved, last_head = SDMHead.from_pretrained(best / "sdm_head"), SDMHead.from_pretrained(last / "sdm_head")
    ours, theirs, other = head_tensors(trainer.head), head_tensors(saved), head_tensors(last_head)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=0)
    assert any(not torch.equal(ours[k], other[k]) for k in ours if ours[k].shape == other[k].shape)
    best_state = SDMEpochState.from_json((best / STATE_NAME).read_text(), documents=trainer.documents)
    assert torch.equal(trainer.epoch_state.support_row, best_state.support_row)
    assert trainer.epochs.loss_head is trainer.head
    # a best checkpoint without a head: no head is kept for the restored weights, and a warning says so
    shutil.rmtree(best / "sdm_head")
    with pytest.warns(UserWarning, match="has no sdm_head"):
        trainer._load_best_model()
    assert trainer.head is None and trainer.epoch_state.support_row is None


# -- pushes ------------------------------------------------------------------------------------
class RecordingApi:
    """Stands in for transformers' shared HfApi: records what each upload would commit (the
    files under folder_path that its patterns let through, read at the call, as a background
    upload starts reading at once)."""

    def __init__(self):
        self.uploads: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        root = Path(folder_path)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        kept = list(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        contents = {name: (root / name).read_bytes() for name in kept}
        self.uploads.append({"path_in_repo": path_in_repo, "files": contents, "message": kwargs.get("commit_message")})
        if kwargs.get("run_as_future"):
            done: Future = Future()
            done.set_result(None)
            return done
        return None


@pytest.fixture
def recording_api(monkeypatch):
    import transformers.trainer

    api = RecordingApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    return api


def assert_no_training_text(upload: dict, texts: list[str]) -> None:
    for name, content in upload["files"].items():
        for text in texts:
            assert text.encode("utf-8") not in content, f"{name} holds the training text {text!r}"


def test_pushes_carry_the_head_and_no_training_text(tmp_path, recording_api):
    trainer = make_trainer(
        tmp_path,
        eval_data=False,
        train=TRAIN[:16],
        num_train_epochs=2,
        save_strategy="epoch",
        gamma_gen=1.0,
        hard_negatives_from_epoch=1,
        push_to_hub=True,
        hub_model_id="user/sdm-tiny",
        hub_strategy="checkpoint",
    )
    trainer.train()
    model_pushes = [u for u in recording_api.uploads if u["path_in_repo"] is None]
    checkpoint_pushes = [u for u in recording_api.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert len(model_pushes) == 2 and len(checkpoint_pushes) == 2  # one of each per epoch
    for push in model_pushes:  # output_dir: model files plus the checkpoint's head, no SDM state
        assert {"model.safetensors", "config.json", "sdm_head/model.safetensors", "sdm_head/config.json"} <= set(
            push["files"]
        )
        assert not any(name.endswith("sdm_trainer_state.json") for name in push["files"])
        assert not any(name.startswith("_") for name in push["files"])
    for push in checkpoint_pushes:  # the whole checkpoint (resumable from the Hub): head and state
        assert {STATE_NAME, "sdm_head/model.safetensors", "trainer_state.json"} <= set(push["files"])
    # the pushed head is the one of the checkpoint pushed with it
    assert (
        model_pushes[-1]["files"]["sdm_head/model.safetensors"]
        == (checkpoint_pushes[-1]["files"]["sdm_head/model.safetensors"])
    )
    state = json.loads(checkpoint_pushes[-1]["files"][STATE_NAME])
    assert state["documents_sha256"] and state["versions"]
    assert all(isinstance(ref, dict) for _, ref, positive in state["versions"] if positive)
    texts = training_texts(TRAIN[:16])
    for push in recording_api.uploads:
        assert_no_training_text(push, texts)
    trainer.push_to_hub()  # the final push: model, head and the SDM card
    final = recording_api.uploads[-1]
    assert final["path_in_repo"] is None and "sdm_head/config.json" in final["files"]
    assert not any(name.endswith("sdm_trainer_state.json") for name in final["files"])
    card = final["files"]["README.md"].decode("utf-8")
    assert SECTION_START in card and "sdm-language-model" in card and "user/sdm-tiny" in card
    assert_no_training_text(final, texts)


def test_no_copy_while_the_previous_push_is_still_running(tmp_path, recording_api):
    trainer = make_trainer(tmp_path, eval_data=False, push_to_hub=True, hub_model_id="user/sdm-tiny")
    checkpoint = tmp_path / "checkpoint-1"
    trainer.save_model(str(checkpoint), _internal_call=True)
    trainer.push_in_progress = SimpleNamespace(is_done=lambda: False)
    trainer._push_from_checkpoint(str(checkpoint))
    assert not (Path(trainer.args.output_dir) / "sdm_head").exists() and recording_api.uploads == []


# -- the SDM state file ------------------------------------------------------------------------
def test_state_file_refers_to_the_documents_instead_of_holding_their_texts():
    documents, _ = prepare_documents(preference(TRAIN[:4]))
    state = SDMEpochState(
        prepared_epoch=1,
        versions=[(0, documents[0].positive, True), (1, documents[1].negatives[0], False), (2, "generated", False)],
        hard_negatives={2: ["generated", documents[3].negatives[0]]},
        previous_hard_negatives={0: [documents[0].positive]},
        support_row=torch.tensor([0, -1, 1, -1]),
    )
    text = state.to_json(documents)
    for training_text in training_texts(TRAIN[:4]):
        assert training_text not in text
    back = SDMEpochState.from_json(text, documents=documents)
    assert back.versions == state.versions and back.hard_negatives == state.hard_negatives
    assert back.previous_hard_negatives == state.previous_hard_negatives
    with pytest.raises(ValueError, match="other training documents"):
        SDMEpochState.from_json(text, source="ckpt/state", documents=list(reversed(documents)))
    with pytest.raises(ValueError, match="pass documents="):
        SDMEpochState.from_json(text, source="ckpt/state")
    with pytest.raises(ValueError, match="beyond the 4 training documents"):
        data = json.loads(text)
        data.pop("documents_sha256")
        data["versions"][0][1] = {"static": [9, 0]}
        SDMEpochState.from_json(json.dumps(data), source="ckpt/state", documents=documents)


def test_a_state_file_of_another_format_is_refused():
    text = SDMEpochState(prepared_epoch=0).to_json()
    assert SDMEpochState.from_json(text).prepared_epoch == 0
    with pytest.raises(ValueError, match="format 1 was written by a pre-release sdm_hf"):
        SDMEpochState.from_json(text.replace('"format": 2', '"format": 1'), source="ckpt/state")
    with pytest.raises(ValueError, match="newer than this sdm_hf reads"):
        SDMEpochState.from_json(text.replace('"format": 2', '"format": 3'), source="ckpt/state")


def test_an_lm_repository_loads_as_a_causal_lm_and_its_head_explains_with_text(tmp_path):
    """load_sdm_model of a saved SDM language model gives the causal-LM class (it can generate),
    and the final head's nearest exemplars carry their completion texts through save and load."""
    from transformers import pipeline

    from sdm_hf.repository import load_sdm_model

    trainer = make_trainer(tmp_path)
    head = trainer.build_final_head(generate=False)
    calibration = {d.positive for d in trainer.eval_documents} | {
        n for d in trainer.eval_documents for n in d.negatives
    }
    assert head.support_texts is not None and set(head.support_texts) <= calibration
    saved = trainer.save_sdm_model(tmp_path / "final")
    model, loaded = load_sdm_model(saved)
    assert hasattr(model, "generate") and type(model).__name__.endswith("ForCausalLM")
    assert loaded.support_texts == head.support_texts
    verify = pipeline("sdm-verify", model=str(saved), device="cpu")
    doc = trainer.eval_documents[0]
    out = verify({"prompt": doc.prompt, "completion": doc.positive})
    assert out["nearest_exemplar"]["text"] in calibration
