"""Filter magnitude (Li et al., 2017): the L1 or L2 norm of each channel's filters.

A unit's channel is produced by several layers when residual adds or depthwise
convs couple them; its magnitude is taken over all of their filters together: the
p-norm of the channel's filters of every writer concatenated, which is the group
reduction (no writer is left out; weights need no per-writer normalisation to be
summed, as Torch-Pruning's group magnitude sums them too). The layers that read the
channel are not part of Li et al.'s filter magnitude; their input slices are WSP's
feed-backward saliency (:mod:`autoprune.criteria.wsp`).
"""

from __future__ import annotations

import torch

from .base import Criterion


def filter_norms(space, p: int) -> dict[str, torch.Tensor]:
    """Per unit, the p-norm of each channel's filters across all the unit's root layers."""
    out = {}
    for unit in space.units:
        total = torch.zeros(unit.width, dtype=torch.double)
        for name in unit.modules:
            w = space.model.get_submodule(name).weight.detach().double().cpu()
            if w.shape[0] == unit.width:
                total += w.abs().pow(p).flatten(1).sum(1)
        out[unit.name] = total.pow(1 / p).float()
    return out


class L1(Criterion):
    """L1 norm of the unit's filters (the default selection score)."""

    name = "l1"

    def score(self, space, stats):
        return filter_norms(space, 1)


class L2(Criterion):
    """L2 norm of the unit's filters."""

    name = "l2"

    def score(self, space, stats):
        return filter_norms(space, 2)
