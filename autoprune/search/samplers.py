"""The Optuna samplers a search space can name, and which of their arguments YAML can set.

A space names one of :data:`SAMPLERS`; every other key of its ``sampler`` section is a keyword
argument of that Optuna class, typed from the class's own signature (int, float, bool, str or
null: :func:`sampler_args`) and bounded where Optuna checks only when it samples, or never
(:func:`value_problem`). Nothing here knows about files or keys: :mod:`.validate` says where.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Mapping

import optuna

__all__ = ["MAX_SAMPLER_INT", "SAMPLERS", "build", "multiobjective_samplers", "sampler_args",
           "sampler_class", "value_problem"]

SAMPLERS = ("tpe", "nsga2", "cmaes", "gp", "random")
MAX_SAMPLER_INT = 100_000
_YAML_KINDS = ("int", "float", "bool", "str", "None")
# Bounds optuna itself checks only when it samples (or never): name -> (low, high, open low).
_SAMPLER_BOUNDS = {"n_startup_trials": (0, MAX_SAMPLER_INT, False),
                   "n_ei_candidates": (1, MAX_SAMPLER_INT, False),
                   "population_size": (2, MAX_SAMPLER_INT, False),
                   "popsize": (2, MAX_SAMPLER_INT, False),
                   "inc_popsize": (-1, MAX_SAMPLER_INT, False),
                   "prior_weight": (0.0, 1e6, False), "sigma0": (0.0, 1e6, True),
                   "mutation_prob": (0.0, 1.0, False), "crossover_prob": (0.0, 1.0, False),
                   "swapping_prob": (0.0, 1.0, False)}


def _gp_multiobjective() -> bool:
    """Optuna's GPSampler handles several objectives from v4.4 on."""
    major, minor = (int(x) for x in re.findall(r"\d+", optuna.__version__)[:2])
    return (major, minor) >= (4, 4)


def multiobjective_samplers() -> tuple[str, ...]:
    """The samplers that handle two objectives (objective ``accuracy_flops``) in this Optuna."""
    return ("tpe", "nsga2", "random") + (("gp",) if _gp_multiobjective() else ())


def sampler_class(name: str) -> type:
    """Optuna's sampler class for a name in :data:`SAMPLERS`."""
    s = optuna.samplers
    return {"tpe": s.TPESampler, "nsga2": s.NSGAIISampler, "cmaes": s.CmaEsSampler,
            "gp": s.GPSampler, "random": s.RandomSampler}[name]


def build(name: str, settings: Mapping[str, Any], seed: int) -> optuna.samplers.BaseSampler:
    """Sampler ``name`` built with ``settings`` (its keyword arguments) and ``seed``;
    raises whatever Optuna raises for settings it rejects."""
    return sampler_class(name)(seed=seed, **settings)


def _split_union(annotation: str) -> list[str]:
    """``"int | None"`` → ``["int", "None"]``, splitting only outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(annotation):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "|" and depth == 0:
            parts.append(annotation[start:i].strip())
            start = i + 1
    parts.append(annotation[start:].strip())
    if len(parts) == 1 and parts[0].startswith("Optional[") and parts[0].endswith("]"):
        return [parts[0][9:-1].strip(), "None"]
    return parts


def sampler_args(cls: type) -> dict[str, tuple[str, ...] | str]:
    """Keyword arguments of sampler ``cls`` (seed aside): name → the YAML kinds it takes
    (from its annotation, else its default's type), or the annotation text when it
    takes only Python objects (callables, samplers, trials) that YAML cannot write."""
    out: dict[str, tuple[str, ...] | str] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "seed") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.annotation is p.empty:
            kinds = [type(p.default).__name__] if p.default is not p.empty else []
            kinds = [k.replace("NoneType", "None") for k in kinds]
            text = "unannotated"
        else:
            text = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
            kinds = _split_union(text)
        yaml_kinds = tuple(k for k in _YAML_KINDS if k in kinds)
        out[name] = yaml_kinds if set(yaml_kinds) - {"None"} else text
    return out


def value_problem(arg: str, value: object, kinds: tuple[str, ...], what: str) -> str | None:
    """What is wrong with ``value`` for sampler argument ``arg`` (``"must be ... (what)"``),
    or None when it is one of ``kinds`` and within the argument's bounds."""
    low, high, low_open = _SAMPLER_BOUNDS.get(arg, (None, None, False))
    if value is None and "None" in kinds:
        return None
    if isinstance(value, bool):
        ok = "bool" in kinds
    elif isinstance(value, int):
        ok = "int" in kinds or "float" in kinds
        low = -MAX_SAMPLER_INT if low is None else low
        high = MAX_SAMPLER_INT if high is None else high
    elif isinstance(value, float):
        ok = "float" in kinds and math.isfinite(value)
        low = -1e6 if low is None else low
        high = 1e6 if high is None else high
    elif isinstance(value, str):
        ok = "str" in kinds and len(value) <= 100
    else:
        ok = False
    if not ok:
        names = {"int": "an integer", "float": "a number", "bool": "true or false",
                 "str": "a string (at most 100 characters)", "None": "null"}
        return f"must be {' or '.join(names[k] for k in kinds)} ({what})"
    if low is None or high is None:
        return None
    if value > high or value < low or (low_open and value == low):
        return f"must be in {'(' if low_open else '['}{low:g}, {high:g}] ({what})"
    return None
