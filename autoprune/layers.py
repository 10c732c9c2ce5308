"""The layer kinds and input conventions :mod:`autoprune.space` and :mod:`autoprune.cost` share.

Kept apart so that the two import one way (space → cost → layers): the Space builds its
cost model, and the cost model needs nothing of the Space's module.
"""

from __future__ import annotations

import torch
from torch import nn

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layers whose output channels a unit removes (and whose input channels consumers read)."""

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)
"""Normalisation layers pruned along with the channels they normalise."""

BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""The norms with running statistics (adaptive BN re-estimates them); torch's public classes,
which lazy batch norms become once initialised."""


def as_input_tuple(example_input: torch.Tensor | tuple) -> tuple:
    """A model's positional inputs: ``example_input`` itself if a tuple, else ``(example_input,)``."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Name → module of every module without children."""
    return {n: m for n, m in model.named_modules() if not list(m.children())}


__all__ = ["NORM_TYPES", "ROOT_TYPES", "as_input_tuple", "leaf_modules"]
