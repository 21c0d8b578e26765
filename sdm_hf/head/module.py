"""The trainable part of an SDM head: feature normalisation, adaptor and classifier.

Schmaltz (2025), Similarity-Distance-Magnitude Activations, arXiv:2509.12760:
``h' = W (x - mean) / std + b`` (the exemplar, ``R^D -> R^M``) and ``z' = V h' + c`` (the logits, ``R^M -> R^C``).
"""

from __future__ import annotations

import copy
import math
from typing import cast

import torch
from torch import nn

from ..utils.validation import ArrayLike
from .config import HEAD_FIXED_FIELDS, SUPPORT_FIELDS, WEIGHT_FIELDS, SDMConfig, fixed_field_message

__all__ = ["SDMModule"]


class SDMModule(nn.Module):
    """Normalisation buffers + adaptor + classifier (:class:`~sdm_hf.SDMHead` adds support and calibration).

    Args:
        config: the :class:`~sdm_hf.SDMConfig` (``input_dim`` D, ``exemplar_dim`` M, ``num_classes`` C).
        generator: optional ``torch.Generator`` for reproducible initial weights.

    Raises:
        TypeError: ``config`` is not an SDMConfig.
    """

    adaptor: nn.Linear
    classifier: nn.Linear
    feature_mean: torch.Tensor  # buffer: () or [D]
    feature_std: torch.Tensor  # buffer: () or [D], > 0

    def __init__(self, config: SDMConfig, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(config, SDMConfig):
            raise TypeError(f"config must be an SDMConfig, got {type(config).__name__}")
        self._config: SDMConfig | None = None
        self.config = config
        self.adaptor = nn.Linear(config.input_dim, config.exemplar_dim)
        self.classifier = nn.Linear(config.exemplar_dim, config.num_classes)
        shape = () if config.normalization == "scalar" else (config.input_dim,)
        self.register_buffer("feature_mean", torch.zeros(shape))
        self.register_buffer("feature_std", torch.ones(shape))
        self.reset_parameters(generator)

    @property
    def config(self) -> SDMConfig:
        """The head's own copy of its :class:`~sdm_hf.SDMConfig`. Assigned fields are validated; those the
        weights, support or calibration depend on raise ValueError saying what to do instead."""
        return cast(SDMConfig, self._config)  # set in __init__, before anything reads it

    @config.setter
    def config(self, config: SDMConfig) -> None:
        if not isinstance(config, SDMConfig):
            raise TypeError(f"config must be an SDMConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        if self._config is not None:
            self._check_replacement(self._config, config)
        object.__setattr__(config, "_fixed", HEAD_FIXED_FIELDS)
        previous, self._config = self._config, config
        if previous is not None:
            self._adopt(previous)

    def _check_replacement(self, old: SDMConfig, new: SDMConfig) -> None:
        """Raise ValueError when ``new`` changes what the weights (or a built support index) depend on."""
        fixed = WEIGHT_FIELDS + (SUPPORT_FIELDS if getattr(self, "support", None) is not None else ())
        for name in fixed:
            if getattr(old, name) != getattr(new, name):
                raise ValueError(f"the new config changes {name}: {fixed_field_message(name)}")

    def _adopt(self, previous: SDMConfig) -> None:
        """Hook run after ``head.config = new`` replaced ``previous`` (the head recalibrates)."""

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise both layers uniform in ``[-1, 1] / sqrt(fan_in)`` (as ``nn.Linear``), from ``generator``."""
        for layer in (self.adaptor, self.classifier):
            bound = 1.0 / math.sqrt(layer.in_features)
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)

    @property
    def device(self) -> torch.device:
        return self.adaptor.weight.device

    def set_normalization(self, mean: ArrayLike | float, std: ArrayLike | float) -> None:
        """Set the feature normalisation ``(x - mean) / std``.

        Args:
            mean, std: scalars (``normalization="scalar"``) or ``(D,)`` (``"feature"``), as float32.

        Raises:
            ValueError: wrong shapes, non-finite values or ``std <= 0``.
        """
        mean = torch.as_tensor(mean, dtype=torch.float32)
        std = torch.as_tensor(std, dtype=torch.float32)
        want = tuple(self.feature_mean.shape)
        if tuple(mean.shape) != want or tuple(std.shape) != want:
            raise ValueError(
                f"mean and std must have shape {want} for normalization="
                f"{self.config.normalization!r}; got {tuple(mean.shape)} and {tuple(std.shape)}"
            )
        if not bool(torch.isfinite(mean).all() & torch.isfinite(std).all() & (std > 0).all()):
            raise ValueError("mean must be finite and std finite and > 0")
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(std)

    @staticmethod
    def normalization_statistics(x: torch.Tensor, normalization: str = "scalar") -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` of training features ``x (N, D)``: scalars over all elements or ``(D,)`` per feature
        (unbiased std; zero std replaced by 1)."""
        if normalization == "scalar":
            mean, std = x.mean(), x.std()
        else:
            mean, std = x.mean(dim=0), x.std(dim=0)
        return mean, torch.where(std > 0, std, torch.ones_like(std))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` raw features -> ``(B, D)`` normalised features."""
        return (x - self.feature_mean) / self.feature_std

    def encode(self, normalized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, D)`` normalised features -> ``(exemplars (B, M), logits (B, C))``."""
        exemplars = self.adaptor(normalized)
        return exemplars, self.classifier(exemplars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)`` raw features -> ``(B, C)`` logits ``z'`` (differentiable)."""
        return self.encode(self.normalize(x))[1]

    @torch.no_grad()
    def encode_for_inference(self, x: torch.Tensor, batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, D)`` raw features -> ``(exemplars (B, M), logits (B, C))`` float32, ``batch_size`` rows at a time.

        Computed in float64 so that a point's exemplar does not depend on the batch it arrives in.

        Raises:
            ValueError: ``batch_size`` is not a positive integer.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer (rows encoded at a time), got {batch_size!r}")
        weights = [t.double() for t in (self.adaptor.weight, self.adaptor.bias)]
        head_weights = [t.double() for t in (self.classifier.weight, self.classifier.bias)]
        mean, std = self.feature_mean.double(), self.feature_std.double()
        exemplars, logits = [], []
        for start in range(0, x.shape[0], batch_size):  # bounded working set
            normalized = (x[start : start + batch_size].to(self.device).double() - mean) / std
            e = torch.nn.functional.linear(normalized, *weights)
            exemplars.append(e.float())
            logits.append(torch.nn.functional.linear(e, *head_weights).float())
        if not exemplars:
            m, c = self.config.exemplar_dim, self.config.num_classes
            return x.new_zeros((0, m)), x.new_zeros((0, c))
        return torch.cat(exemplars), torch.cat(logits)
