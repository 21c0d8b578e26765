"""sdm_hf.lm.loss: beta = e is cross-entropy; accumulation does not change the loss."""

import math

import torch

from sdm_hf.lm.encoding import IGNORE_INDEX
from sdm_hf.lm.loss import sdm_next_token_loss


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
