"""BN scale (network slimming, Liu et al., 2017): |γ| of the unit's norm layers.

Coupled units (residual adds) have several norm layers, one per writer of the stream;
their |γ| are summed, so every member counts (each γ scales what its writer adds to the
channel, and the sum bounds the channel's total scale). Units without an affine norm
layer raise ModelError naming the unit (no silent fallback).
"""

from __future__ import annotations


from ..errors import ModelError
from .base import Criterion


class BNScale(Criterion):
    """Sum of |γ| over the unit's normalisation layers."""

    name = "bn_scale"

    def score(self, space, stats):
        out = {}
        for unit in space.units:
            gammas = [space.model.get_submodule(n).weight for n in unit.norms
                      if getattr(space.model.get_submodule(n), "weight", None) is not None]
            if not gammas:
                raise ModelError(f"bn_scale: unit {unit.name} has no affine norm layer; use l1 or l2")
            out[unit.name] = sum(g.detach().abs().float().cpu() for g in gammas)
        return out
