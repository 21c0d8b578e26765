"""The SDM next-token loss: cross-entropy with a per-document change of base (Schmaltz 2025,
*Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.2, Eq. 1).

Document ``n`` gets ``beta_n = 2 + sdm(z')_{y_n}`` (detached, in [2, 3]) from the verification head; each
unmasked position ``t`` contributes ``-log_softmax(z_t ln beta_n)[w_t] / ln beta_n``, and the loss divides
their sum by the token count of the whole accumulated batch; ``beta = e`` is the plain cross-entropy.
Passing :func:`supervised_logit_mask` to a causal LM as ``logits_to_keep`` makes it project only the
supervised positions onto the vocabulary, with the same loss and gradients.
(Derivation: docs/how_sdm_works.md, section 'The SDM next-token loss (§3.2)'.)
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from .masks import IGNORE_INDEX

__all__ = ["sdm_next_token_loss", "supervised_logit_mask", "accepts_logits_to_keep"]


def supervised_logit_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(B, T)`` bool: True at ``t`` iff ``labels[:, t + 1] != -100`` (its logits predict a supervised
    token); the last position is always False.

    Args:
        labels: ``(B, T)`` long targets aligned with the inputs, -100 = ignored.

    Raises:
        ValueError: ``labels`` is not 2-D.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [batch, length], got shape {tuple(labels.shape)}")
    mask = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward (through DDP's ``.module`` and PEFT's base model) takes ``logits_to_keep``."""
    inner: Any = model
    for _ in range(4):  # DDP / accelerate wrappers, then PEFT's PeftModel -> LoraModel -> model
        if isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        elif callable(getattr(inner, "get_base_model", None)):
            inner = inner.get_base_model()
        else:
            break
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def sdm_next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: torch.Tensor | float = math.e,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_t -log_softmax(z_t ln beta_n)[w_t] / ln beta_n`` over unmasked tokens, divided by the token count.

    Args:
        logits: ``(B, T, V)`` LM logits, or ``(N, V)`` at only the positions of ``supervised_logit_mask(labels)``
            (row-major, as a causal LM returns them for ``logits_to_keep=<that mask>``); any float dtype.
        labels: ``(B, T)`` long targets aligned with the inputs (shifted here), -100 = ignored.
        beta: ``(B,)`` per-document base in [2, 3], or a scalar; detached.
        num_items_in_batch: unmasked target tokens in the whole accumulated batch (transformers passes it);
            None = this batch's count.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: ``[N, V]`` logits whose N is not the number of supervised positions.
    """
    labels = labels.to(logits.device)
    beta = torch.as_tensor(beta, dtype=torch.float32, device=logits.device).detach()
    if beta.dim() == 0:
        beta = beta.expand(labels.shape[0])
    if logits.dim() == 2:  # only the supervised positions
        mask = supervised_logit_mask(labels)
        if logits.shape[0] != int(mask.sum()):
            raise ValueError(
                f"got {logits.shape[0]} rows of logits but labels supervise {int(mask.sum())} positions; "
                "pass logits_to_keep=supervised_logit_mask(labels) to the model, or full [B, T, V] logits"
            )
        targets = labels[:, 1:][mask[:, :-1]]
        log_base = torch.log(beta)[mask.nonzero()[:, 0]].view(-1, 1)
        flat = logits.float()
    else:
        targets = labels[:, 1:].reshape(-1)
        log_base = torch.log(beta).view(-1, 1, 1).expand(-1, logits.shape[1] - 1, 1).reshape(-1, 1)
        flat = logits[:, :-1, :].float().reshape(-1, logits.shape[-1])
    keep = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(flat * log_base, dim=-1)
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) / log_base.squeeze(-1)
    total = -(picked * keep).sum()
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count
