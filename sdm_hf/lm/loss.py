"""The SDM next-token loss: cross-entropy with a per-document change of base (Schmaltz
2025, *Similarity-Distance-Magnitude Language Models*, arXiv:2510.26183, Sec. 3.2, Eq. 1).

For document ``n`` with reward label ``y_n`` and verification-head output for the current
weights, ``beta_n = 2 + sdm(z')_{y_n}`` (detached, in [2, 3]); every unmasked position ``t``
contributes ``-log_softmax(z_t ln beta_n)[target] / ln beta_n``. The batch loss is the sum
over unmasked tokens divided by the token count of the whole (accumulated) batch, so
gradient accumulation does not change it. ``beta = e`` everywhere is exactly the standard
cross-entropy.
"""

from __future__ import annotations

import math

import torch

from .encoding import IGNORE_INDEX

__all__ = ["sdm_next_token_loss"]


def sdm_next_token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    beta: torch.Tensor | float = math.e,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Change-of-base next-token loss.

    Args:
        logits: ``[B, T, V]`` LM logits.
        labels: ``[B, T]`` targets aligned with the inputs (shifted here), -100 = ignored.
        beta: ``[B]`` per-document base in [2, 3] (or a scalar); detached.
        num_items_in_batch: unmasked target tokens in the whole accumulated batch
            (transformers passes it); None = this batch's count.

    Returns:
        Scalar loss.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = labels[:, 1:].to(shift_logits.device)
    beta = torch.as_tensor(beta, dtype=shift_logits.dtype, device=shift_logits.device).detach()
    if beta.dim() == 0:
        beta = beta.expand(shift_logits.shape[0])
    log_base = torch.log(beta).view(-1, 1, 1)
    log_probs = torch.log_softmax(shift_logits * log_base, dim=-1) / log_base
    mask = targets != IGNORE_INDEX
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = -(picked * mask).sum()
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count
