"""Model-side helpers of SDM fine-tuning: :func:`disable_dropout`, :func:`eval_mode_hidden_states`."""

from __future__ import annotations

import torch

__all__ = ["disable_dropout", "eval_mode_hidden_states"]

# Attention and hidden-state dropout that some architectures apply functionally
# (``F.dropout(x, p=self.attention_dropout)``) instead of through an ``nn.Dropout`` module.
_DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "hidden_dropout")


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout probability of ``model`` to 0, in place, and return it.

    The verification head is fitted on eval-mode features; with dropout off, the hidden
    states of a training forward are those same features, so the SDM loss reads them from
    the forward that computes the loss instead of running a second one (as TRL's preference
    trainers, this is on by default: ``SDMTrainingArguments.disable_dropout``).

    Covers ``nn.Dropout`` modules (LoRA's ``lora_dropout`` included) and the float
    attributes ``attention_dropout``, ``dropout`` and ``hidden_dropout`` that attention
    implementations pass to ``F.dropout``. The model's config is left unchanged.

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
    """``[B, T, H]`` hidden states of ``layer`` (default the final one) of ``model(**inputs)`` in
    eval mode (dropout off), restoring the training mode afterwards.

    With ``lean_logits`` (the model's forward takes ``logits_to_keep``) the vocabulary is
    projected at one position only, since only the hidden states are wanted.
    """
    was_training = model.training
    model.eval()
    try:
        keep = {"logits_to_keep": 1} if lean_logits else {}
        return model(**inputs, output_hidden_states=True, **keep).hidden_states[layer]
    finally:
        model.train(was_training)
