"""The verification head's features: which layer and which pooling, recorded in the head and
honoured by the sdm-verify pipeline."""

import pytest
import torch
from transformers import pipeline

import sdm_hf  # noqa: F401  (registers the pipelines)
from sdm_hf.lm import SDMTrainer, pool_verification_states, verification_features
from sdm_hf.lm.verification_features import verification_feature_pooling, verification_pooling_of
from tests.helpers import harvard_sentences, make_args, preference, tiny_causal_lm, tiny_tokenizer

SENTENCES = harvard_sentences(48)


def test_pooling_names_round_trip_and_bad_ones_are_refused(tmp_path):
    for pooling in ("mean_last", "last", "mean"):
        assert verification_pooling_of(verification_feature_pooling(pooling)) == pooling
    assert verification_pooling_of(None) == "mean_last"
    with pytest.raises(ValueError, match="verification pooling must be one of"):
        make_args(tmp_path, verification_pooling="cls")
    with pytest.raises(ValueError, match="not the feature pooling of an LM verification head"):
        verification_pooling_of("mean")


def test_last_state_of_an_inner_layer_is_trained_on_recorded_and_served(tmp_path):
    tok = tiny_tokenizer()
    trainer = SDMTrainer(
        model=tiny_causal_lm(tok),
        args=make_args(tmp_path, verification_pooling="last", verification_layer=-2, num_train_epochs=1),
        train_dataset=preference(SENTENCES[:32]),
        eval_dataset=preference(SENTENCES[32:]),
        processing_class=tok,
    )
    hidden_size = trainer.model.config.hidden_size
    head = trainer.head
    assert head.config.feature_pooling == "verification-last" and head.config.feature_layer == -2
    assert head.config.input_dim == hidden_size  # one state, not the mean and the state
    # the loss's features (same forward) are those of a separate pass with the same settings
    rows = trainer.train_dataset.rows[:6]
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        out = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    same_forward = pool_verification_states(out.hidden_states[-2], batch["verified_position"], "last")
    texts = [tok.decode(r["input_ids"]) for r in rows]
    completions = [t.split("<|assistant|>")[1].replace("<|end|>", "") for t in texts]
    prompts = [trainer.documents[r["document_id"]].prompt for r in rows]
    separate = verification_features(trainer.model, tok, prompts, completions, layer=-2, pooling="last")
    torch.testing.assert_close(same_forward, separate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        separate, verification_features(trainer.model, tok, prompts, completions)[:, :hidden_size]
    )
    trainer.train()
    final = trainer.build_final_head(generate=False)
    saved = trainer.save_sdm_model(tmp_path / "final")
    verify = pipeline("sdm-verify", model=str(saved), device="cpu")
    served = verify([{"prompt": p, "completion": c} for p, c in zip(prompts[:3], completions[:3])], batch_size=3)
    expected = final.predict(
        verification_features(trainer.model, tok, prompts[:3], completions[:3], layer=-2, pooling="last")
    )
    assert [r["probability"] for r in served] == pytest.approx(expected.probabilities[:, 1].tolist(), rel=1e-5)
