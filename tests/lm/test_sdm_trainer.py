"""SDMTrainer end to end on a tiny Llama: loss, epochs, evaluation, checkpoints, PEFT."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from sdm_hf.lm import (
    HardNegativeCallback,
    HeadRefreshCallback,
    SDMTrainer,
    pool_verification_states,
    verification_features,
)
from sdm_hf.lm.control import ControlTokens
from sdm_hf.lm.state import STATE_NAME
from tests.helpers import harvard_sentences, make_args, make_trainer, preference, tiny_causal_lm, tiny_tokenizer

SENTENCES = harvard_sentences(48)


def test_beta_e_is_the_standard_cross_entropy(tmp_path):
    trainer = make_trainer(tmp_path, use_sdm_loss=False)
    batch = trainer.data_collator(trainer.train_dataset.rows[:8])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    reference = trainer.model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    torch.testing.assert_close(loss, reference)


def test_sdm_loss_uses_the_head_and_same_forward_features(tmp_path):
    trainer = make_trainer(tmp_path)
    rows = trainer.train_dataset.rows[:6]
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        out = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    same_forward = pool_verification_states(out.hidden_states[-1], batch["verified_position"])
    docs = [trainer.documents[r["document_id"]] for r in rows]
    tok = trainer.processing_class
    texts = [tok.decode(r["input_ids"]) for r in rows]
    completions = [t.split("<|assistant|>")[1].replace("<|end|>", "") for t in texts]
    separate = verification_features(trainer.model, tok, [d.prompt for d in docs], completions)
    torch.testing.assert_close(same_forward, separate, rtol=1e-4, atol=1e-5)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    ce = make_trainer(tmp_path, use_sdm_loss=False, model=trainer.model).compute_loss(trainer.model, dict(batch))
    assert torch.isfinite(loss) and not torch.isclose(loss, ce)  # beta in [2, 3] changes the loss


def test_gradient_accumulation_does_not_change_the_update(tmp_path):
    weights = []
    for batch_size, steps in ((8, 1), (4, 2)):
        tok = tiny_tokenizer()
        trainer = SDMTrainer(
            model=tiny_causal_lm(tok),
            processing_class=tok,
            train_dataset=preference(SENTENCES[:32]),
            args=make_args(
                tmp_path,
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=steps,
                max_steps=1,
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
            ),
        )
        trainer.train()
        weights.append(trainer.model.model.embed_tokens.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-6)


def test_epochs_refresh_head_and_generate_hard_negatives(tmp_path):
    trainer = make_trainer(tmp_path, gamma_gen=1.0, hard_negatives_from_epoch=1, num_train_epochs=3)
    heads = []
    original = trainer.epochs.heads.fit

    def spy(rows, seed, timing=None, features=None, keep_texts=False, calibration_mask=None):
        result = original(rows, seed, timing, features, keep_texts, calibration_mask)
        heads.append(seed)
        return result

    trainer.epochs.heads.fit = spy
    trainer.train()
    assert [e["epoch"] for e in trainer.epoch_log] == [0, 1, 2]
    assert all(e["head_fit_seconds"] > 0 and e["head_features_seconds"] > 0 for e in trainer.epoch_log)
    assert trainer.epoch_log[0]["generated"] == 0 and trainer.epoch_log[1]["generated"] > 0
    assert len([s for s in heads if s < 77]) == 2  # epochs 1 and 2 (epoch 0 was fitted at construction)
    for negatives in trainer.hard_negatives.values():
        assert all(n.endswith("<verified>No</verified>") for n in negatives)


def test_correct_generations_are_never_negatives(tmp_path):
    tok = tiny_tokenizer()
    trainer = SDMTrainer(
        model=tiny_causal_lm(tok),
        processing_class=tok,
        train_dataset=preference(SENTENCES[:32]),
        args=make_args(tmp_path, gamma_gen=1.0, hard_negatives_from_epoch=0),
        verifier=lambda positive, generation: True,
    )
    assert trainer.epoch_log[0]["generated"] > 0 and trainer.hard_negatives == {}


def test_evaluate_and_best_checkpoint(tmp_path):
    trainer = make_trainer(
        tmp_path,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"]) and "eval_head_hr_admission" in metrics
    best = trainer.state.best_model_checkpoint
    assert best is not None and (tmp_path / "out").exists()
    assert (Path(best) / "sdm_head" / "config.json").is_file()
    head = trainer.build_final_head()
    assert head.support.ntotal > 0
    saved = trainer.save_sdm_model(tmp_path / "final")
    assert (saved / "sdm_head" / "model.safetensors").is_file() and (saved / "config.json").is_file()


def test_lora_model_trains(tmp_path):
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    model = peft.get_peft_model(tiny_causal_lm(tok), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer = SDMTrainer(
        model=model,
        processing_class=tok,
        train_dataset=preference(SENTENCES[:32]),
        args=make_args(tmp_path, num_train_epochs=1),
    )
    trainer.train()
    assert trainer.head is not None


def test_bad_input(tmp_path):
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="gamma_pos"):
        make_args(tmp_path, gamma_pos=1.5)
    with pytest.raises(ValueError, match="prompt/chosen/rejected"):
        SDMTrainer(
            model=tiny_causal_lm(tok),
            processing_class=tok,
            args=make_args(tmp_path),
            train_dataset=Dataset.from_list([{"text": "x"}]),
        )
    bad = Dataset.from_list([{"prompt": "p", "chosen": "a" + ControlTokens().suffix(False), "rejected": "b"}])
    with pytest.raises(ValueError, match="opposite control suffix"):
        SDMTrainer(model=tiny_causal_lm(tok), processing_class=tok, args=make_args(tmp_path), train_dataset=bad)
    with pytest.raises(ValueError, match="lacks its control suffix"):
        SDMTrainer(
            model=tiny_causal_lm(tok),
            processing_class=tok,
            args=make_args(tmp_path),
            train_dataset=preference(SENTENCES[:8]),
            append_control=False,
        )


def test_unpaired_format_groups_by_prompt():
    from sdm_hf.lm import prepare_documents

    # a plain list of rows: arrow cannot mix string and message-list cells in one column
    rows = list(
        [
            {"prompt": "p1", "completion": "good", "label": True},
            {"prompt": "p1", "completion": "bad", "label": False},
            {"prompt": "p1", "completion": "worse", "label": False},
            {
                "prompt": [{"role": "user", "content": "p2"}],
                "completion": [{"role": "assistant", "content": "ok"}],
                "label": True,
            },
            {"prompt": "p3", "completion": "only bad", "label": False},
        ]
    )
    with pytest.warns(UserWarning, match="1 prompt"):
        documents, negative_only = prepare_documents(rows)
    assert len(documents) == 2 and len(negative_only) == 1
    assert documents[0].negatives == ["bad<verified>No</verified>", "worse<verified>No</verified>"]
    assert documents[1].positive == "ok<verified>Yes</verified>" and documents[1].negatives == []


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    common = dict(num_train_epochs=3, save_strategy="epoch", gamma_gen=1.0, hard_negatives_from_epoch=1)
    tok = tiny_tokenizer()
    full = SDMTrainer(
        model=tiny_causal_lm(tok),
        processing_class=tok,
        train_dataset=preference(SENTENCES[:32]),
        args=make_args(tmp_path / "a", **common),
    )
    full.train()
    expected = full.model.model.embed_tokens.weight.detach().clone()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-8"  # end of epoch 2 of 3 (4 steps per epoch)
    assert (checkpoint / STATE_NAME).is_file() and (checkpoint / "sdm_head").is_dir()
    tok = tiny_tokenizer()
    resumed = SDMTrainer(
        model=tiny_causal_lm(tok, seed=5),
        processing_class=tok,
        train_dataset=preference(SENTENCES[:32]),
        args=make_args(tmp_path / "b", **common),
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(resumed.model.model.embed_tokens.weight, expected, rtol=1e-5, atol=1e-6)
    assert resumed.hard_negatives == full.hard_negatives
    assert resumed.epoch_state.versions == full.epoch_state.versions


def test_resume_from_a_damaged_state_file_names_it(tmp_path):
    tok = tiny_tokenizer()
    args = make_args(tmp_path, num_train_epochs=1, save_strategy="epoch", use_sdm_loss=False)
    SDMTrainer(
        model=tiny_causal_lm(tok), processing_class=tok, train_dataset=preference(SENTENCES[:16]), args=args
    ).train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    (damaged / STATE_NAME).write_text('{"format": 1, "prepared_epoch": NaN}')
    tok = tiny_tokenizer()
    again = SDMTrainer(
        model=tiny_causal_lm(tok), processing_class=tok, train_dataset=preference(SENTENCES[:16]), args=args
    )
    with pytest.raises(ValueError, match=rf"{STATE_NAME}.*NaN"):
        again.train(resume_from_checkpoint=str(damaged))


def test_callbacks_get_the_runs_epochs_and_each_epoch_is_prepared_once(tmp_path):
    trainer = make_trainer(tmp_path, eval_data=False, gamma_gen=1.0, hard_negatives_from_epoch=1)
    ours = [c for c in trainer.callback_handler.callbacks if isinstance(c, (HardNegativeCallback, HeadRefreshCallback))]
    assert [type(cb) for cb in ours] == [HardNegativeCallback, HeadRefreshCallback]  # versions before the head
    assert all(cb.epochs is trainer.epochs for cb in ours) and not any(hasattr(cb, "trainer") for cb in ours)
    head, log = trainer.head, list(trainer.epoch_log)
    trainer.epochs.start_epoch(0)  # already prepared at construction
    assert trainer.head is head and trainer.epoch_log == log
    with pytest.raises(ValueError, match="prepare_epoch_versions"):
        trainer.epochs.refresh_verification_head(1)
    epoch_one = SimpleNamespace(epoch=1.0)
    for cb in ours:  # what the Trainer does at the start of the second epoch
        cb.on_epoch_begin(trainer.args, epoch_one, trainer.control)
    assert trainer.epoch_state.prepared_epoch == 1 and trainer.epoch_log[-1]["epoch"] == 1
    assert trainer.epoch_log[-1]["generated"] > 0 and trainer.epoch_log[-1]["head_fit_seconds"] > 0
    assert trainer.head is not head and trainer.epoch_state.previous_hard_negatives == {}
    versions = [(r["document_id"], r["text"], bool(r["reward"])) for r in trainer.train_dataset.rows]
    assert versions == trainer.epoch_state.versions


def test_final_head_uses_wrong_generations(tmp_path):
    trainer = make_trainer(tmp_path, num_train_epochs=1)
    trainer.train()
    head = trainer.build_final_head(generate=True)
    assert trainer.epochs.final_head_generated_negatives > 0  # an untrained tiny LM is wrong
    positives, negatives = 16, 16 + trainer.epochs.final_head_generated_negatives
    assert head.support.ntotal + head.calibration_arrays["labels"].numel() == positives + negatives


def test_final_head_calibrated_on_the_models_own_generations(tmp_path):
    trainer = make_trainer(tmp_path, num_train_epochs=1, use_sdm_loss=False)
    docs = trainer.eval_documents
    control = trainer.control_tokens
    # stand-in generations: right for even documents, wrong (content of another) for odd ones
    generations = [d.positive if i % 2 == 0 else docs[(i + 1) % len(docs)].positive for i, d in enumerate(docs)]
    head = trainer.build_final_head(calibration="generations", generations=generations)
    epochs = trainer.epochs
    assert epochs.final_head_calibration == "generations" and epochs.final_head_generations == generations
    labels = head.calibration_arrays["labels"]
    half = len(docs) - len(docs) // 2  # one calibration row per held-out prompt: its generation
    assert labels.numel() == half
    # the training half holds the papers' mix of the other prompts (each positive and its negatives)
    held_out = [i for i, d in enumerate(docs) if d.positive not in head.support_texts]
    assert len(held_out) == half and head.support.ntotal >= 2 * (len(docs) - half)
    verdicts = [
        trainer.epochs.verifier(control.remove_suffix(docs[i].positive), control.remove_suffix(generations[i]))
        for i in held_out
    ]
    assert int(labels.sum()) == sum(verdicts) and 0 < sum(verdicts) < half
    # the saved head and the card say what its calibration rows were (its promise is about rows like them)
    trainer.save_sdm_model(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "sdm_head" / "config.json").read_text())
    assert "own greedy generations" in saved["selection"]["calibration_source"]
    trainer.create_model_card()  # the Trainer's card (output_dir/README.md) with the SDM section
    assert "Calibration rows of this head: the model's own greedy generations" in (
        Path(trainer.args.output_dir) / "README.md"
    ).read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="'mixed' or 'generations'"):
        trainer.build_final_head(calibration="own")
    with pytest.raises(ValueError, match="one text per evaluation document"):
        trainer.build_final_head(generations=generations[:3])


def test_gpt2_style_model_trains_and_verifies(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=256,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    trainer = SDMTrainer(
        model=model,
        processing_class=tok,
        train_dataset=preference(SENTENCES[:32]),
        args=make_args(tmp_path, num_train_epochs=1, gamma_gen=1.0, hard_negatives_from_epoch=0),
    )
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))  # disable_dropout
    trainer.train()
    assert trainer.head is not None and trainer.epoch_log[0]["generated"] > 0


@pytest.mark.parametrize("diversity", [0.0, 1.0])
def test_gamma_diversity_decides_whether_wrong_generations_replace_the_negative(tmp_path, diversity):
    trainer = make_trainer(tmp_path, gamma_gen=1.0, hard_negatives_from_epoch=0, gamma_diversity=diversity)
    generated = {doc_id: set(v) for doc_id, v in trainer.hard_negatives.items()}
    assert generated  # an untrained LM is wrong
    used = [row["text"] in generated.get(row["document_id"], ()) for row in trainer.train_dataset.rows]
    assert any(used) == (diversity == 1.0)
    if diversity == 1.0:  # every wrong generation replaced its document's static negative
        assert sum(used) == len(generated)


def test_lean_logits_give_the_same_sdm_loss_and_gradients_as_full_logits(tmp_path):
    lean = make_trainer(tmp_path / "lean")
    full = make_trainer(tmp_path / "full", lean_logits=False, model=lean.model)
    assert lean._lean_logits and not full._lean_logits
    # the same head
    full.epochs.loss_head, full.epochs.loss_support_row = lean.epochs.loss_head, lean.epochs.loss_support_row
    batch = lean.data_collator(lean.train_dataset.rows[:8])
    results = []
    for trainer in (lean, full):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)
