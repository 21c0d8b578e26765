"""SDMTrainer: evaluation over a given dataset or a dict of them, and bad input."""

import math

import pytest
from datasets import Dataset

from sdm_hf.lm import SDMTrainer
from tests.helpers import harvard_sentences, make_args, preference, tiny_causal_lm, tiny_tokenizer

SENTENCES = harvard_sentences(56)


def _trainer(tmp_path, eval_dataset, **changes):
    tok = tiny_tokenizer()
    return SDMTrainer(
        model=tiny_causal_lm(tok),
        args=make_args(tmp_path, **changes),
        train_dataset=preference(SENTENCES[:24]),
        eval_dataset=eval_dataset,
        processing_class=tok,
    )


def test_evaluate_a_dict_of_sets_prefixes_each_and_a_given_set_equals_the_constructors(tmp_path):
    calib, other = preference(SENTENCES[24:40]), preference(SENTENCES[40:56])
    trainer = _trainer(tmp_path, {"calib": calib, "other": other}, eval_strategy="epoch", num_train_epochs=1)
    assert trainer.eval_documents is trainer.epochs.eval_sets["calib"]  # the first set is the calibration set
    trainer.train()
    logged = {k for e in trainer.state.log_history for k in e}
    assert {"eval_calib_loss", "eval_other_loss", "eval_calib_head_hr_admission"} <= logged
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_calib_loss"]) and math.isfinite(metrics["eval_other_loss"])
    assert "eval_loss" not in metrics
    # the same data given to evaluate(): prepared the same way, so the same loss
    again = trainer.evaluate(eval_dataset={"calib": calib})
    assert again["eval_calib_loss"] == pytest.approx(metrics["eval_calib_loss"], rel=1e-6)
    single = trainer.evaluate(eval_dataset=other, metric_key_prefix="test")
    assert single["test_loss"] == pytest.approx(metrics["eval_other_loss"], rel=1e-6)
    assert {"test_head_hr_empty", "test_head_hr_admission"} <= set(single)
    assert ("test_head_q_min" in single) == (single["test_head_hr_empty"] == 0.0)  # q'_min only when not empty
    with pytest.raises(ValueError, match="no evaluation set named 'nope'"):
        trainer.evaluate(eval_dataset="nope")


def test_bad_input_is_reported_before_training(tmp_path):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="train_dataset has no trainable document"):
        SDMTrainer(
            model=tiny_causal_lm(tiny_tokenizer()),
            args=make_args(tmp_path),
            train_dataset=empty,
            processing_class=tiny_tokenizer(),
        )
    with pytest.raises(ValueError, match="evaluation set 'eval_dataset' has no document"):
        _trainer(tmp_path, empty)
    with pytest.raises(ValueError, match="eval_dataset is an empty dict"):
        _trainer(tmp_path, {})
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": None, "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match="row 1: column 'prompt' must be a string"):
        _trainer(tmp_path, rows)
    with pytest.raises(ValueError, match="row 0: column 'chosen' must be a string"):
        _trainer(tmp_path, [{"prompt": "p", "chosen": None, "rejected": "b"}])
    with pytest.raises(ValueError, match="row 0: column 'label' must be a bool"):
        _trainer(tmp_path, [{"prompt": "p", "completion": "a", "label": None}])
    for name in ("head_epochs", "head_shuffles", "head_batch_size", "max_new_tokens"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            make_args(tmp_path, **{name: 0})
    with pytest.raises(ValueError, match="head_learning_rate must be > 0"):
        make_args(tmp_path, head_learning_rate=0.0)


def _unpaired(sentences, negative_only):
    rows = []
    for s in sentences:
        rows += [
            {"prompt": f"Repeat: {s}", "completion": s, "label": True},
            {"prompt": f"Repeat: {s}", "completion": " ".join(reversed(s.split())), "label": False},
        ]
    rows += [{"prompt": f"Repeat: {s}", "completion": s.upper(), "label": False} for s in negative_only]
    return Dataset.from_list(rows)


def test_prompts_without_a_positive_reach_the_verification_heads_only(tmp_path):
    tok = tiny_tokenizer()
    with pytest.warns(UserWarning, match="verification head only"):
        trainer = SDMTrainer(
            model=tiny_causal_lm(tok),
            args=make_args(tmp_path, num_train_epochs=1),
            train_dataset=_unpaired(SENTENCES[:30], SENTENCES[30:36]),
            eval_dataset=_unpaired(SENTENCES[36:52], SENTENCES[52:56]),
            processing_class=tok,
        )
    assert len(trainer.documents) == 30 and len(trainer.epochs.negative_only_documents) == 6
    assert [d.id for d in trainer.epochs.negative_only_documents] == list(range(30, 36))
    assert len(trainer.train_dataset) == 30  # the LM trains on the 30 documents only
    head = trainer.head  # fitted on 30 + 6 versions, split in halves
    assert head is not None and head.support.ntotal + head.calibration.size == 36
    assert trainer.epoch_state.support_row.numel() == 36 and bool((trainer.epoch_state.support_row[30:] >= 0).any())
    final = trainer.build_final_head(generate=False)
    # every calibration version: 16 positives, 16 static negatives and 4 negative-only prompts
    assert final.support.ntotal + final.calibration.size == 36


@pytest.mark.parametrize("timing", ["epoch_start", "in_epoch"])
def test_hard_negatives_at_epoch_start_or_in_the_epoch_with_the_current_weights(tmp_path, timing):
    tok = tiny_tokenizer()
    trainer = SDMTrainer(
        model=tiny_causal_lm(tok),
        args=make_args(
            tmp_path,
            num_train_epochs=2,
            per_device_train_batch_size=4,
            gamma_gen=1.0,
            gamma_diversity=1.0,
            hard_negatives_from_epoch=1,
            hard_negative_timing=timing,
        ),
        train_dataset=preference(SENTENCES[:24]),
        processing_class=tok,
    )
    weights_seen = []
    generate = trainer.epochs.generate_completions

    def spy(documents):
        weights_seen.append(float(sum(p.double().sum() for p in trainer.model.parameters())))
        return generate(documents)

    trainer.epochs.generate_completions = spy
    swapped = []
    in_batch = trainer.epochs.generate_in_batch

    def batch_spy(inputs):
        out = in_batch(inputs)
        swapped.append(out is not inputs)
        return out

    trainer.epochs.generate_in_batch = batch_spy
    trainer.train()
    negatives_scheduled = sum(1 for r in trainer.epochs.train_versions.rows if r["reward"] == 0)
    assert trainer.epoch_log[0]["generated"] == 0 and trainer.epoch_log[1]["generated"] == negatives_scheduled > 0
    assert trainer.hard_negatives and all(
        n.endswith("<verified>No</verified>") for v in trainer.hard_negatives.values() for n in v
    )
    if timing == "epoch_start":  # one batched call, before the epoch's first step
        assert len(weights_seen) == 1
    else:  # one call per batch holding scheduled documents, each with that step's weights
        assert len(weights_seen) > 1 and len(set(weights_seen)) == len(weights_seen)
        assert any(swapped)  # wrong generations replaced static negatives inside their batches


def test_refresh_steps_show_no_bars_of_their_own_and_log_one_line(tmp_path, capsys, caplog):
    """Inside the Trainer its bar is the one bar: the refresh steps (generation, head features,
    head fit) show none, and each epoch's refresh is one readable log line."""
    import logging

    with caplog.at_level(logging.INFO, logger="sdm_hf.lm.epochs"):
        trainer = _trainer(tmp_path, None, gamma_gen=1.0, hard_negatives_from_epoch=0, num_train_epochs=1)
        trainer.train()
    err = capsys.readouterr().err
    assert not any(bar in err for bar in ("generating", "SDM head features", "fit_sdm_head"))
    lines = [r.getMessage() for r in caplog.records if r.name == "sdm_hf.lm.epochs"]
    assert lines and all(line.startswith("SDM epoch ") for line in lines)
    assert "-1" not in " ".join(lines) and ("HR region empty" in lines[0] or "HR region from q' >=" in lines[0])


def test_a_failed_state_write_keeps_the_previous_state_file(tmp_path, monkeypatch):
    """The SDM state file of a checkpoint is replaced atomically: a save that fails while
    writing it leaves the previous, loadable file."""
    import os

    from sdm_hf.lm.state import STATE_NAME

    trainer = _trainer(tmp_path, None)
    folder = tmp_path / "checkpoint"
    trainer._save(str(folder))
    before = (folder / STATE_NAME).read_text()
    trainer.epoch_state.prepared_epoch = 5  # a different state to write
    real_replace = os.replace

    def failing(src, dst):
        if str(dst).endswith(STATE_NAME):
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        trainer._save(str(folder))
    monkeypatch.setattr(os, "replace", real_replace)
    assert (folder / STATE_NAME).read_text() == before
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_one_entry_dict_of_evaluation_sets_is_prefixed_by_its_name(tmp_path):
    trainer = _trainer(tmp_path, {"calib": preference(SENTENCES[24:40])})
    metrics = trainer.evaluate()
    assert "eval_calib_loss" in metrics and "eval_loss" not in metrics
    assert {"eval_calib_head_hr_empty", "eval_calib_head_hr_admission"} <= set(metrics)


def test_in_epoch_generation_state_survives_a_checkpoint_and_repeated_ids(tmp_path):
    import torch

    from sdm_hf.lm.state import SDMEpochState

    state = SDMEpochState(prepared_epoch=1, pending_generation={3: True, 7: False})
    assert SDMEpochState.from_json(state.to_json()).pending_generation == {3: True, 7: False}
    assert SDMEpochState.from_json(SDMEpochState().to_json()).pending_generation == {}
    trainer = _trainer(tmp_path, None, hard_negative_timing="in_epoch")
    trainer.epoch_state.pending_generation = {2: True}
    rows = [trainer.epochs.train_versions.rows[2], trainer.epochs.train_versions.rows[2]]  # wrapped-around batch
    batch = trainer.data_collator(rows)
    out = trainer.epochs.generate_in_batch(batch)  # no KeyError: the document is generated for once
    assert trainer.epoch_state.pending_generation == {} and out["input_ids"].shape[0] == 2
    assert torch.equal(out["document_id"], torch.tensor([2, 2]))
