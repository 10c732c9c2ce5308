"""WSP — weak sub-network saliency (Neural Networks 144:614, 2021).

Each channel ``k`` of a unit has a feed-forward saliency ``f_k`` (how strongly it is
produced) and a feed-backward saliency ``b_k`` (how strongly the next layer uses it).

- ``weight`` variant (default; the authors' released code): ``f_k = ‖W_l[k]‖₁``, the
  L1 norm of channel k's filters summed over all the unit's root layers, and
  ``b_k = ‖W_{l+1}[:, k]‖₁``, the L1 norm of the input slices that read channel k,
  summed over every consumer of the unit (a flatten into a linear layer gives several
  input positions per channel; grouped consumers are handled per group). Data-free.
- ``data`` variant: ``f_k`` = mean |activation| and ``b_k`` = mean |gradient| of
  channel k at the ``post`` tap, averaged over images and positions (gradient of each
  image's own cross-entropy). Because it needs a gradient pass it is its own
  registered criterion, ``wsp_data``; calibrate with it. A unit read by several layers
  (a residual stream) keeps one summary per reader and takes the mean over readers of
  ``f`` and of ``b`` (:func:`~autoprune.criteria.base.reduce_members`, ``same_scale``:
  every reader reads the same stream, and every gradient is of the same loss).

A channel is *weak* iff ``f_k < P_p(f)`` and ``b_k < P_p(b)`` (p-th percentiles within
its unit); :mod:`autoprune.wsp` removes all weak channels in one shot. As a score for
mixes, ``min(rank(f_k), rank(b_k))`` normalised to [0, 1] within the unit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import Batch, Criterion, members, per_image_means, reduce_members

VARIANTS = ("weight", "data")


def _consumer_slice_norms(weight: torch.Tensor, groups: int, positions, channels, width: int) -> torch.Tensor:
    """Per unit channel, the L1 norm of the consumer weights reading its input positions.

    A grouped consumer's input position ``g·(in/groups) + j`` is read by group g's rows
    of weight column j; a channel spread over several positions sums them all.
    """
    w = weight.detach().cpu()
    out_ch, per_group = w.shape[0], w.shape[1]
    rows = out_ch // groups
    column = w.abs().reshape(groups, rows, per_group, -1).sum((1, 3), dtype=torch.double).flatten()
    pos = torch.as_tensor(positions, dtype=torch.long)
    ch = torch.as_tensor(channels, dtype=torch.long)
    return torch.zeros(width, dtype=torch.double).index_add_(0, ch, column[pos])


def weight_saliency(space) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per unit, ``(f, b)``: its filters' L1 norms and its consumers' input-slice L1 norms."""
    model = space.model
    out = {}
    for unit in space.units:
        f = torch.zeros(unit.width, dtype=torch.double)
        for name in unit.modules:
            w = model.get_submodule(name).weight.detach().cpu()
            if w.shape[0] == unit.width:
                f += w.abs().flatten(1).sum(1, dtype=torch.double)
        b = torch.zeros(unit.width, dtype=torch.double)
        for name, positions, channels in unit.consumers:
            layer = model.get_submodule(name)
            groups = layer.groups if isinstance(layer, nn.modules.conv._ConvNd) else 1
            b += _consumer_slice_norms(layer.weight, groups, positions, channels, unit.width)
        out[unit.name] = (f, b)
    return out


def data_saliency(stats) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per unit, ``(f, b)`` = mean |activation| and mean |gradient| from ``wsp_data`` summaries."""
    out = {}
    for unit, state in stats.of(WSPData.name).items():
        what = f"wsp_data: unit {unit}"
        out[unit] = tuple(reduce_members(per_image_means(state[key], state["count"], what), same_scale=True)
                          for key in ("act", "grad"))
    return out


def saliency(space, stats=None, variant: str = "weight") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per unit, WSP's ``(f, b)`` (float64 tensors [width]) for ``variant`` weight or data."""
    if variant == "weight":
        return weight_saliency(space)
    if variant == "data":
        if stats is None:
            raise ValueError("wsp variant 'data' reads activations and gradients: calibrate with "
                             "criteria=['wsp_data'] and pass the stats")
        return data_saliency(stats)
    raise ValueError(f"wsp variant must be one of {VARIANTS}, got {variant!r}")


def weak_channels(sal: dict[str, tuple[torch.Tensor, torch.Tensor]], p: float) -> dict[str, np.ndarray]:
    """Per unit, a boolean mask of weak channels: ``f < P_p(f)`` and ``b < P_p(b)``.

    Percentiles are numpy's (linear interpolation) over the unit's channels, so
    ``p = 0`` marks nothing weak and larger ``p`` never marks fewer channels.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"wsp percentile p must be in [0, 100], got {p}")
    out = {}
    for unit, (f, b) in sal.items():
        f, b = np.asarray(f, dtype=np.float64), np.asarray(b, dtype=np.float64)
        out[unit] = (f < np.percentile(f, p)) & (b < np.percentile(b, p))
    return out


def min_rank_score(f: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``min(rank(f), rank(b))`` scaled to [0, 1] within the unit (ties share ranks)."""
    from . import rank_normalise
    return torch.minimum(rank_normalise(f), rank_normalise(b)).float()


class WSP(Criterion):
    """WSP min-rank score, weight-proxy variant (data-free).

    Param ``variant`` (default ``"weight"``); ``variant="data"`` reads the summaries
    of the ``wsp_data`` criterion, which must then have been calibrated.
    """

    name = "wsp"

    def score(self, space, stats):
        sal = saliency(space, stats, self.params.get("variant", "weight"))
        return {u: min_rank_score(f, b) for u, (f, b) in sal.items()}


class WSPData(Criterion):
    """WSP min-rank score, data-driven variant: mean |a| and mean |∂ℓ/∂a| at ``post``."""

    name = "wsp_data"
    tap = "post"
    needs_grad = True

    def init(self, unit, space):
        readers = len(members(unit, "post"))
        return {"act": torch.zeros(readers, unit.width, dtype=torch.double),
                "grad": torch.zeros(readers, unit.width, dtype=torch.double),
                "count": torch.zeros(readers, dtype=torch.double)}

    def update(self, unit, state, batch: Batch) -> None:
        grads = batch.member_grads("post", unit)
        for j, a in batch.member_maps("post", unit):
            n = a.shape[0]
            state["act"][j] += a.double().abs().reshape(n, unit.width, -1).mean(2).sum(0).cpu()
            g = grads.get(j)
            if g is not None:  # batch-mean loss: times n gives each image's own gradient
                state["grad"][j] += (g.double().abs() * n).reshape(n, unit.width, -1).mean(2).sum(0).cpu()
            state["count"][j] += n

    def score(self, space, stats):
        return {u: min_rank_score(f, b) for u, (f, b) in data_saliency(stats).items()}


__all__ = ["WSP", "WSPData", "data_saliency", "min_rank_score", "saliency", "weak_channels",
           "weight_saliency"]
