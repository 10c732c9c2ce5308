"""Re-ranking on the current pruned network, and DI of channel subsets, for the DI greedy.

The authors re-rank each unit's channels by DI computed on the current pruned network
every iteration (METHODS.md §1). :class:`Rescorer` does that on the greedy's masked
working copy: it calibrates the run's criteria again with the committed channel masks
held (:func:`autoprune.calibrate.calibrate`, the same images every time) and scores only
the channels each unit still keeps. Calibration taps a unit's conv output before its norm
layer, which the mask (at the norm output) leaves whole, so a unit's own removed channels
are still in its summaries: DI ranks the kept channels by their exact ΔDI *within the kept
set* (the kept sub-matrices of the scatters, and the ridge of the kept set: what DI scores
on the physically pruned network), other criteria by their scores of the kept
channels, and a mix rank-normalises over the kept channels. Every unit is recalibrated: a
forward pass dominates the cost and every unit downstream of a cut changes, so skipping the
upstream units' summary updates would save almost nothing (for DI, one C×C outer product
per unit and batch).

:class:`DIScatter` holds each unit's scatter matrices (one pair per writer layer of a
coupled unit) and the criterion's ridge rule, and gives DI of any channel subset: the
criterion mode's "DI actually lost" (``DI(kept now) − DI(kept after)``, the mean over a
coupled unit's writers, as :class:`autoprune.criteria.di.DI` averages their ΔDI), on DI's
one dimensionless scale for every unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from . import criteria
from .calibrate import calibrate
from .criteria.base import Stats
from .criteria.di import (DEFAULT_RHO_REL, default_rho, delta_di_from_scatter, di_from_scatter,
                          member_summaries, scatter_from_summary)
from .greedy_masks import channel_masks
from .space import Space

Scatter = tuple[torch.Tensor, torch.Tensor]
"""One writer's total scatter ``S̄`` and between-class scatter ``S_B`` over the unit's channels."""


@dataclass(frozen=True)
class DIScatter:
    """Per unit, each writer's :data:`Scatter`; DI of channel subsets from them.

    The ridge is the criterion's: ``rho`` if given, else ``rho_rel · tr(S̄)/D`` of the channel
    set the question is about (the kept set; for DI lost, the set before the cut, for both
    terms), i.e. what :class:`autoprune.criteria.di.DI` computes on the pruned network."""

    units: dict[str, list[Scatter]]
    rho: float | None = None
    rho_rel: float = DEFAULT_RHO_REL

    @classmethod
    def from_stats(cls, per_unit: Mapping[str, dict], rho: float | None = None,
                   rho_rel: float = DEFAULT_RHO_REL) -> "DIScatter":
        """From the ``di`` criterion's summaries (``stats.of("di")``) and its params."""
        units = {name: [scatter_from_summary(summary) for summary in member_summaries(state)]
                 for name, state in per_unit.items()}
        return cls(units, None if rho is None else float(rho), float(rho_rel))

    def _rho(self, total: torch.Tensor, keep: Sequence[int]) -> float:
        if self.rho is not None:
            return self.rho
        idx = torch.as_tensor(list(keep), dtype=torch.long)
        return default_rho(total[idx][:, idx], self.rho_rel)

    def value(self, unit: str, keep: Sequence[int], rho_of: Sequence[int] | None = None) -> float:
        """DI of the channels ``keep`` of ``unit`` (mean over its writers), with the ridge of
        the set ``rho_of`` (default ``keep``)."""
        keep = list(keep)
        return float(np.mean([di_from_scatter(t, b, self._rho(t, keep if rho_of is None else rho_of), keep=keep)
                              for t, b in self.units[unit]]))

    def lost(self, unit: str, before: Sequence[int], after: Sequence[int]) -> float:
        """DI of ``before`` minus DI of its subset ``after`` (one ridge): the DI actually lost."""
        return self.value(unit, before) - self.value(unit, after, rho_of=before)

    def drops(self, unit: str, keep: Sequence[int]) -> np.ndarray:
        """Each kept channel's exact ΔDI within the set ``keep`` (``keep`` order; writers' mean)."""
        keep = list(keep)
        per_writer = [delta_di_from_scatter(t, b, self._rho(t, keep), keep=keep).numpy() for t, b in self.units[unit]]
        return np.mean(per_writer, axis=0)


def di_scatter(stats: Stats, params: Mapping | None = None) -> DIScatter:
    """:class:`DIScatter` of the ``di`` summaries in ``stats``, with the criterion's ``params``."""
    params = dict(params or {})
    return DIScatter.from_stats(stats.of("di"), params.get("rho"), float(params.get("rho_rel", DEFAULT_RHO_REL)))


@dataclass(frozen=True)
class Rescored:
    """Per unit, the scores of its kept channels (in kept order; higher = keep), and the new
    DI summaries when ``di`` is among the criteria."""

    scores: dict[str, np.ndarray]
    di: DIScatter | None = None


class Rescorer:
    """Re-scores every unit's kept channels on ``model`` under the committed masks.

    ``weights`` are the run's criterion weights (one criterion or a mix), ``params`` each
    criterion's calibration/scoring params (as :func:`autoprune.calibrate.calibrate` recorded
    them in ``stats.settings["criteria"]``), ``batches`` the calibration images (re-iterable:
    every call passes over them again, ``n_images`` of them). ``model`` is the greedy's working copy (it may be fine-tuned or
    have re-estimated BN statistics between calls); ``calls`` counts the re-scorings.
    A criterion that needs inputs besides the summaries (``fpar``: its attention,
    :meth:`autoprune.criteria.base.Criterion.inputs`) computes them once, on the first
    call's network without masks, with ``seed``, and reuses them at every re-scoring: FPAR's
    premise is that the mean attention gates barely move, and re-training the probes every
    step would cost more than the step (a documented simplification of "re-rank on the
    current network"). Reconstruction: ``di_fullmap`` scores the kept channels from the full pre-norm maps,
    whose removed channels still count in its DI (only ``di`` restricts exactly).
    """

    def __init__(self, space: Space, model: nn.Module, batches: Iterable, weights: Mapping[str, float],
                 params: Mapping[str, Mapping] | None = None, n_images: int = 512, seed: int = 0,
                 device=None) -> None:
        self.space, self.model, self.batches = space, model, batches
        self.weights = dict(weights)
        self.params = {name: dict((params or {}).get(name, {})) for name in self.weights}
        self.specs = [(name, self.params[name]) for name in self.weights if criteria.get(name).taps()]
        self.n_images, self.seed, self.device = n_images, seed, device
        self.inputs: dict[str, dict] = {}
        self.calls = 0

    def _inputs(self, name: str) -> dict:
        """What criterion ``name`` needs besides its summaries, computed once (see the class doc)."""
        if name not in self.inputs:
            crit = criteria.get(name, **self.params[name])
            self.inputs[name] = dict(crit.inputs(self.space, self.model, self.batches, seed=self.seed,
                                                 device=self.device)) if crit.requires else {}
        return self.inputs[name]

    def __call__(self, masks: Mapping[str, torch.Tensor], kept: Mapping[str, Sequence[int]]) -> Rescored:
        self.calls += 1
        stats = Stats()
        if self.specs:
            with channel_masks(self.model, self.space, masks):
                stats = calibrate(self.space, self.model, self.batches, self.specs, n_images=self.n_images,
                                  progress=False)
        per_criterion, di = {}, None
        for name in self.weights:
            if name == "di":
                di = di_scatter(stats, self.params[name])
                per_criterion[name] = {u: torch.from_numpy(di.drops(u, kept[u])) for u in kept}
            else:
                full = criteria.score(name, self.space, stats, **self.params[name], **self._inputs(name))
                per_criterion[name] = {u: full[u].double().cpu()[list(kept[u])] for u in kept}
        if len(self.weights) == 1:
            scores = per_criterion[next(iter(self.weights))]
        else:
            scores = criteria.mix(self.weights, per_criterion)
        return Rescored({u: np.asarray(torch.as_tensor(s).double()) for u, s in scores.items()}, di)


__all__ = ["DIScatter", "Rescored", "Rescorer", "Scatter", "di_scatter"]
