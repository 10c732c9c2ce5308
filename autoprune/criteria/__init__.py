"""Pruning criteria: one module per family, all behind :class:`~.base.Criterion`.

>>> stats = autoprune.calibrate(space, model, batches, criteria=["di", "hrank"])
>>> scores = autoprune.criteria.score("di", space, stats)      # {unit: Tensor[width]}
>>> mixed = autoprune.criteria.mix({"di": 0.6, "hrank": 0.4}, {"di": s1, "hrank": s2})
>>> autoprune.criteria.parse_mix("di:0.6,hrank:0.4")              # {"di": 0.6, "hrank": 0.4}
"""

from __future__ import annotations

import difflib
import importlib
import math
import pkgutil
from typing import Mapping

import torch

from ..errors import CriterionError, short
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


def standalone() -> list[str]:
    """Criteria scored from calibration summaries alone (``Criterion.requires`` empty). The
    others (``fpar``: its attention) compute what they require from the model and the
    calibration images (:meth:`Criterion.inputs`): :func:`autoprune.prune` and the search
    do that, a caller of :func:`score` passes it."""
    return [n for n in available() if not getattr(_discover()[n], "requires", ())]


def get(name: str, **params) -> Criterion:
    """A configured instance of criterion ``name``."""
    registry = _discover()
    if not isinstance(name, str) or name not in registry:
        near = difflib.get_close_matches(name[:100], registry, n=3) if isinstance(name, str) else []
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise CriterionError(f"unknown criterion {short(name)}{hint} (available: {', '.join(available())})")
    return registry[name](**params)


def check_params(params: "Mapping[str, Mapping[str, object]] | None",
                 weights: Mapping[str, float]) -> dict[str, dict[str, object]]:
    """The user's criterion settings ``{criterion: {setting: value}}`` as plain dicts, each
    checked by its criterion (:meth:`Criterion.check`); CriterionError (one line) for a
    criterion the mix ``weights`` does not use, a setting it does not take or a bad value."""
    if params is None:
        return {}
    example = "e.g. {'fpar': {'lam': 0.5}}"
    if not isinstance(params, Mapping):
        raise CriterionError(f"criterion_params must map criterion names to their settings ({example}), "
                             f"got {short(params)}")
    out = {}
    for name, settings in params.items():
        if name not in weights:
            raise CriterionError(f"criterion_params names {short(name)}, which the criterion mix "
                                 f"({', '.join(weights)}) does not use")
        if not isinstance(settings, Mapping) or not all(isinstance(k, str) for k in settings):
            raise CriterionError(f"criterion_params[{name!r}] must map setting names to values "
                                 f"({example}), got {short(settings)}")
        get(name, **settings).check()
        out[name] = dict(settings)
    return out


def parse_mix(spec: "str | Mapping[str, float]") -> dict[str, float]:
    """Criterion weights from ``"di"``, ``"di:0.6,hpse:0.4"`` or ``{"di": 0.6, "hpse": 0.4}``.

    A bare name weighs 1. CriterionError (one line, naming the rule) for an unknown name, a
    name given twice, or weights breaking :func:`check_weights`.
    """
    if isinstance(spec, Mapping):
        weights = dict(spec)
    elif isinstance(spec, str):
        text = spec.strip()
        if ":" not in text and "," not in text:
            weights = {text: 1.0}
        else:
            weights = {}
            for part in text.split(","):
                name, colon, w = (p.strip() for p in part.partition(":"))
                if not colon or not name:
                    raise CriterionError(f"criterion mix {short(spec)}: part {short(part.strip())} is not "
                                         "NAME:WEIGHT; write NAME or NAME:WEIGHT,NAME:WEIGHT (e.g. di:0.6,hpse:0.4)")
                if name in weights:
                    raise CriterionError(f"criterion mix {short(spec)} names {short(name)} twice; "
                                         "give each criterion once")
                try:
                    weights[name] = float(w)
                except ValueError:
                    raise CriterionError(f"criterion mix {short(spec)}: weight {short(w)} of {short(name)} is "
                                         "not a number; write NAME:WEIGHT,NAME:WEIGHT (e.g. di:0.6,hpse:0.4)") from None
    else:
        raise CriterionError(f"criterion must be a name, 'NAME:WEIGHT,...' or a dict of weights, "
                             f"got {short(spec)}")
    for name in weights:
        get(name)
    return check_weights(weights, spec)


def check_weights(weights: Mapping[str, float], spec: object = None) -> dict[str, float]:
    """``weights`` as floats, if every one is finite and >= 0 and at least one is > 0."""
    what = f"criterion mix {short(spec if spec is not None else dict(weights))}"
    if not weights:
        raise CriterionError(f"{what} is empty; give at least one criterion (e.g. di or di:0.6,hpse:0.4)")
    out = {}
    for name, w in weights.items():
        ok = isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        if not ok:
            raise CriterionError(f"{what}: weight of {short(name)} is {short(w)}; weights must be finite "
                                 "numbers >= 0 with at least one above 0")
        out[name] = float(w)
    if not any(w > 0 for w in out.values()):
        raise CriterionError(f"{what}: every weight is 0; weights must be finite numbers >= 0 with at "
                             "least one above 0")
    if not math.isfinite(sum(out.values())):
        raise CriterionError(f"{what}: the weights sum to infinity; use smaller weights (only their "
                             "ratios matter)")
    return out


def score(name: str, space, stats: Stats | None = None, **params) -> dict[str, torch.Tensor]:
    """Per-unit channel scores of criterion ``name`` (higher = keep)."""
    crit = get(name, **params)
    if crit.taps() and stats is None:
        raise ValueError(f"criterion {name!r} reads activations: calibrate first and pass stats")
    return crit.score(space, stats if stats is not None else Stats())


def score_with_inputs(name: str, space, stats: Stats | None, model, batches,
                      params: Mapping[str, object] | None = None, *, seed: int = 0,
                      device=None) -> dict[str, torch.Tensor]:
    """:func:`score` of criterion ``name`` with ``params``, after computing what it
    ``requires`` besides the summaries (:meth:`Criterion.inputs`; fpar: its attention) from
    ``model`` on ``batches``, the (re-iterable) images ``stats`` were calibrated on, with
    ``seed``. The one place :func:`autoprune.prune`, the search and a re-scoring call."""
    params = dict(params or {})
    crit = get(name, **params)
    if crit.requires:
        if batches is None:
            raise ValueError(f"criterion {name!r} computes {', '.join(crit.requires)} from the model on the "
                             "calibration images: pass them as batches")
        params.update(crit.inputs(space, model, batches, seed=seed, device=device))
    return score(name, space, stats, **params)


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
    """Weighted sum of per-unit rank-normalised scores of several criteria.

    ``weights`` follow :func:`check_weights` (CriterionError otherwise).
    """
    weights = check_weights(weights)
    missing = set(weights) - set(scores)
    if missing:
        raise CriterionError(f"mix needs scores for {short(sorted(missing))}; got scores for "
                             f"{short(sorted(scores))}")
    units = scores[next(iter(weights))].keys()
    return {u: sum(w * rank_normalise(scores[c][u]) for c, w in weights.items() if w > 0)
            for u in units}


__all__ = ["Batch", "Criterion", "Stats", "available", "check_params", "check_weights", "get", "mix", "parse_mix",
           "rank_normalise", "score", "score_with_inputs", "standalone"]
