"""Pruning criteria: one module per family, all behind :class:`~.base.Criterion`.

>>> stats = autoprune.calibrate(space, model, batches, criteria=["di", "hrank"])
>>> scores = autoprune.criteria.score("di", space, stats)      # {unit: Tensor[width]}
>>> mixed = autoprune.criteria.mix({"di": 0.6, "hrank": 0.4}, {"di": s1, "hrank": s2})
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Mapping

import torch

from .base import Batch, Criterion, Stats

_REGISTRY: dict[str, type[Criterion]] = {}


def _discover() -> dict[str, type[Criterion]]:
    """Import every module of this package once and register its Criterion subclasses."""
    if not _REGISTRY:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base":
                importlib.import_module(f"{__name__}.{info.name}")
        stack = list(Criterion.__subclasses__())
        while stack:
            cls = stack.pop()
            stack += cls.__subclasses__()
            if getattr(cls, "name", None) and cls.__module__.startswith(__name__):
                _REGISTRY[cls.name] = cls
    return _REGISTRY


def available() -> list[str]:
    """Names of all registered criteria."""
    return sorted(_discover())


def get(name: str, **params) -> Criterion:
    """A configured instance of criterion ``name``."""
    registry = _discover()
    if name not in registry:
        from ..errors import AutopruneError
        near = difflib.get_close_matches(name, registry, n=3)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise AutopruneError(f"unknown criterion {name!r}{hint} (available: {', '.join(available())})")
    return registry[name](**params)


def score(name: str, space, stats: Stats | None = None, **params) -> dict[str, torch.Tensor]:
    """Per-unit channel scores of criterion ``name`` (higher = keep)."""
    crit = get(name, **params)
    if crit.taps() and stats is None:
        raise ValueError(f"criterion {name!r} reads activations: calibrate first and pass stats")
    return crit.score(space, stats if stats is not None else Stats())


def rank_normalise(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores`` scaled to [0, 1] (0 = least important); ties share the mean rank."""
    s = scores.double().flatten()
    if s.numel() == 1:
        return torch.ones(1, dtype=torch.double)
    order = torch.argsort(torch.argsort(s, stable=True), stable=True).double()
    for value in torch.unique(s):  # average ranks among ties
        tied = s == value
        order[tied] = order[tied].mean()
    return order / (s.numel() - 1)


def mix(weights: Mapping[str, float], scores: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Weighted sum of per-unit rank-normalised scores of several criteria."""
    if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"mix weights must be non-negative and not all zero, got {dict(weights)}")
    missing = set(weights) - set(scores)
    if missing:
        raise KeyError(f"mix needs scores for {sorted(missing)}")
    units = scores[next(iter(weights))].keys()
    return {u: sum(w * rank_normalise(scores[c][u]) for c, w in weights.items() if w > 0)
            for u in units}


__all__ = ["Batch", "Criterion", "Stats", "available", "get", "mix", "rank_normalise", "score"]
