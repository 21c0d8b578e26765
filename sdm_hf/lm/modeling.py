"""Model-side helpers of SDM fine-tuning: :func:`disable_dropout`, :func:`eval_mode_hidden_states`."""

from __future__ import annotations

import torch

__all__ = ["disable_dropout", "eval_mode_hidden_states"]

# Attention and hidden-state dropout that some architectures apply functionally
# (``F.dropout(x, p=self.attention_dropout)``) instead of through an ``nn.Dropout`` module.
_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "hidden_dropout")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of ``model`` to 0, in place, and return it.

    Covers ``nn.Dropout`` modules (LoRA's included) and the float attributes ``attention_dropout``,
    ``dropout`` and ``hidden_dropout``; the config is unchanged. Why: a training forward's hidden states
    then equal the eval-mode features the verification head is fitted on, so no second forward is needed.

    Example:
        >>> import torch
        >>> net = disable_dropout(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)))
        >>> net[1].p
        0.0
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in _DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


@torch.no_grad()
def eval_mode_hidden_states(
    model: torch.nn.Module, inputs: dict, lean_logits: bool = False, layer: int = -1
) -> torch.Tensor:
    """``(B, T, H)`` hidden states of ``layer`` of ``model(**inputs)`` in eval mode, without gradients (the
    training mode is restored); ``lean_logits``: pass ``logits_to_keep=1`` (the forward must accept it)."""
    was_training = model.training
    model.eval()
    try:
        keep = {"logits_to_keep": 1} if lean_logits else {}
        return model(**inputs, output_hidden_states=True, **keep).hidden_states[layer]
    finally:
        model.train(was_training)
