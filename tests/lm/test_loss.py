"""sdm_hf.lm.loss: beta = e is cross-entropy; accumulation does not change the loss."""

import math

import pytest
import torch

from sdm_hf.lm.loss import accepts_logits_to_keep, sdm_next_token_loss, supervised_logit_mask
from sdm_hf.lm.masks import IGNORE_INDEX
from tests.helpers import tiny_causal_lm, tiny_tokenizer


def test_loss_with_beta_e_is_cross_entropy_and_accumulation_invariant():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 13, generator=g)
    labels = torch.randint(0, 13, (4, 6), generator=g)
    labels[:, :2] = IGNORE_INDEX
    labels[3, 4:] = IGNORE_INDEX
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(sdm_next_token_loss(logits, labels, torch.full((4,), math.e)), ce)
    beta = torch.tensor([2.0, 2.5, 2.9, 2.2])
    whole = sdm_next_token_loss(logits, labels, beta)
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    parts = sum(sdm_next_token_loss(logits[i : i + 2], labels[i : i + 2], beta[i : i + 2], n) for i in (0, 2))
    torch.testing.assert_close(parts, whole)  # two micro-batches with the global count = one batch


def _labels_like_contrastive_masks(generator, batch=5, length=9, vocab=13):
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    starts = torch.randint(1, length - 1, (batch,), generator=generator)
    for row, start in enumerate(starts.tolist()):  # a supervised tail per row, at different offsets
        labels[row, :start] = IGNORE_INDEX
    labels[2, -2:] = IGNORE_INDEX  # right padding
    return labels


def test_supervised_logit_mask_marks_the_positions_that_predict_a_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 4, 5], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    expected = torch.tensor([[False, True, True, False], [True, False, False, False]])
    assert torch.equal(supervised_logit_mask(labels), expected)
    with pytest.raises(ValueError, match="batch, length"):
        supervised_logit_mask(labels[0])


def test_loss_on_supervised_rows_only_equals_the_full_loss_and_gradients():
    g = torch.Generator().manual_seed(3)
    labels = _labels_like_contrastive_masks(g)
    beta = torch.tensor([2.0, 2.7, 3.0, 2.2, 2.5])
    full = torch.randn(5, 9, 13, generator=g, requires_grad=True)
    mask = supervised_logit_mask(labels)
    lean = full.detach()[mask].clone().requires_grad_(True)
    loss_full = sdm_next_token_loss(full, labels, beta, 17)
    loss_lean = sdm_next_token_loss(lean, labels, beta, 17)
    torch.testing.assert_close(loss_lean, loss_full, rtol=0, atol=1e-6)
    loss_full.backward()
    loss_lean.backward()
    torch.testing.assert_close(lean.grad, full.grad[mask])
    assert float(full.grad[~mask].abs().max()) == 0.0  # the full logits' other rows get no gradient anyway
    with pytest.raises(ValueError, match="supervise"):
        sdm_next_token_loss(lean[1:], labels, beta)


def test_logits_to_keep_on_a_real_model_gives_the_same_loss_and_parameter_gradients():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok).train()
    assert accepts_logits_to_keep(model)
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, len(tok), (4, 12), generator=g)
    labels = _labels_like_contrastive_masks(g, batch=4, length=12, vocab=len(tok))
    beta = torch.tensor([2.1, 2.9, 2.4, 3.0])

    def loss_and_grads(lean: bool):
        model.zero_grad()
        keep = {"logits_to_keep": supervised_logit_mask(labels)} if lean else {}
        logits = model(input_ids=input_ids, **keep).logits
        assert logits.dim() == (2 if lean else 3)
        loss = sdm_next_token_loss(logits, labels, beta)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_full, grads_full = loss_and_grads(False)
    loss_lean, grads_lean = loss_and_grads(True)
    torch.testing.assert_close(loss_lean, loss_full)
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_lean[name], grad, msg=name)


def test_accepts_logits_to_keep_sees_through_peft_and_refuses_other_modules():
    peft = pytest.importorskip("peft")
    tok = tiny_tokenizer()
    wrapped = peft.get_peft_model(tiny_causal_lm(tok), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert accepts_logits_to_keep(wrapped)
    assert not accepts_logits_to_keep(torch.nn.Linear(2, 2))
