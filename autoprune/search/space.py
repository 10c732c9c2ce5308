"""Search spaces: YAML files → validated :class:`SearchSpace` → Optuna define-by-run.

A search space says which structures the search may propose, never how big they
are: every candidate is *fitted to the budget analytically* (``Space.fit``), so
every proposal meets the budget and none is rejected. The YAML keys (the shipped
files under ``autoprune/search_spaces/`` comment each one):

``ratios``
    List of rules ``{match, low, high, tie}``. ``match`` is a regex searched in unit
    names (``re.search``; default ``".*"``); the *first* rule that matches a unit wins.
    A regex is at most 200 characters, with at most 5 unbounded repeats (``*``, ``+``,
    ``{n,}``) and no repeated group that itself repeats (``(a+)+``), so matching unit
    names cannot take exponential time. At most 256 rules.
    The unit's prune ratio (the shape handed to ``Space.fit``) is a float in
    ``[low, high]``. Units no rule matches get ratio 0 (fit still shrinks them if the
    budget cannot be met otherwise). ``tie`` decides which units share one variable:

    * ``unit`` (default): one variable per unit, ``ratio/<unit>``;
    * ``stage``: one per stage, ``ratio/<stage>`` (see :func:`stage_of`);
    * ``all``: one for every unit the rule matches, ``ratio/all``;
    * a regex with one capture group: units whose captured text agrees share
      ``ratio/<captured>``; every unit the rule matches must be matched by it.

    A rule with ``low == high`` is a constant, not a variable. Two rules producing
    the same name get the later rule's index appended (``ratio/layer2~1``).
``max_ratio``
    Cap on any unit's prune ratio in ``Space.fit`` (default 0.9); ``high`` may not exceed it.
``clusters``
    ``None`` or ``{method: hpse|fchp|sg, k: [choices], tie}``: cluster-aware selection
    with a cluster count per tie group (``k/<key>``, tied like ratios over all units;
    default ``unit``); at most 64 distinct choices, each in 1..4096 (clamped to a unit's
    width when clustering). HPSE fixes k at calibration, so ``hpse`` takes one k choice
    (or none: the calibration default).
``criteria``
    Criterion names (``autoprune.criteria.available()`` except ``fpar``, which needs an
    attention input the search does not compute yet). With several, each gets a
    weight ``w/<name>`` in [0, 1]; the candidate's mix is the weights divided by their
    sum, and when every weight is 0 (the sum is 0) each criterion gets 1/n: a mix is
    never refused. One name is weight 1, no variable.
``selfgroup``
    ``None`` or ``{k: [choices], cp: [low, high]}``: SG-CNN self-grouping of every
    eligible conv after pruning, one ``sg/k`` and one ``sg/cp`` for the whole model
    (``k`` choices as for clusters).
``proxy``
    Cheap evaluation per trial: ``bn_batches`` (adaptive BN, default 20),
    ``finetune_steps`` (50), ``eval_batches`` (4), ``lr`` (0.01); counts at most
    1,000,000, ``lr`` at most 100.
``sampler``
    ``{name: tpe|nsga2|cmaes|gp|random, ...}``: other keys are keyword arguments of
    the Optuna sampler whose type YAML can write (int, float, bool, str or null, as
    its signature annotates them; ints at most 100,000); the sampler is built once at
    load to check them. The seed comes from the run.
``objective``
    ``accuracy`` (proxy score at the fixed budget) or ``accuracy_flops`` (maximise the
    proxy score, minimise FLOPs: a Pareto front). For ``accuracy_flops`` the sampler
    must handle two objectives (tpe, nsga2, random, gp), and ``budget_scale: [low,
    high]`` (default [0.5, 1.0], fractions of the run's budget) adds the variable
    ``budget/scale``: the candidate is fitted to that fraction of the budget, so the
    FLOPs really vary along the front (see :meth:`Candidate.budget`).
``asha``
    ``None`` or ``{grace_period (1), reduction_factor (4)}``: optional multi-fidelity
    early stopping, used by the runner; ``grace_period`` may not exceed
    ``proxy.finetune_steps`` and ``reduction_factor`` is in (1, 1000].

The file itself is UTF-8 text of at most 1 MiB holding at most 10,000 values nested at
most 8 deep, with no YAML anchors or aliases (``&name``/``*name``: a few of them can
expand to billions of values) and no key twice in one mapping. Every error is one
line naming the file and the key; it shows a user's value cut short (:func:`show`).

Variables are suggested in a fixed order (ratios in unit order, then k, weights,
self-grouping, budget scale), so a seeded sampler proposes the same structures.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import importlib.util
import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna
import yaml

from ..budget import Budget
from ..errors import AutopruneError, clip as _clip, short as show
from ..grouping import METHODS as CLUSTER_METHODS

__all__ = [
    "Candidate",
    "OBJECTIVES",
    "SAMPLERS",
    "SearchSpace",
    "SearchSpaceError",
    "load",
    "packaged",
    "stage_of",
]

SAMPLERS = ("tpe", "nsga2", "cmaes", "gp", "random")
OBJECTIVES = ("accuracy", "accuracy_flops")
TIES = ("unit", "stage", "all")
PROXY_DEFAULTS = {"bn_batches": 20, "finetune_steps": 50, "eval_batches": 4, "lr": 0.01}
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 4}
BUDGET_SCALE_DEFAULT = (0.5, 1.0)
TOP_KEYS = ("description", "ratios", "max_ratio", "clusters", "criteria", "selfgroup", "proxy",
            "sampler", "objective", "budget_scale", "asha")
NOT_IN_SEARCH = {"fpar": "it needs an attention input (criteria.fpar.attention) that the search "
                          "does not compute yet"}
MAX_FILE_BYTES = 1 << 20   # a search space is a small text file
MAX_DEPTH = 8              # YAML nesting (the files need 3)
MAX_NODES = 10_000         # YAML values in one file (the packaged files hold about 50)
MAX_RULES = 256            # ratio rules
MAX_CHOICES = 64           # k choices (clusters, selfgroup)
MAX_K = 4096               # a cluster / group count (clamped to the unit's width anyway)
MAX_STEPS = 1_000_000      # proxy batch/step counts, asha.grace_period
MAX_REGEX = 200            # characters
MAX_REPEATS = 5            # unbounded repeats (*, +, {n,}) in one regex
MAX_SAMPLER_INT = 100_000
_PACKAGE_DIR = "search_spaces"
_NO_VALUE = object()


def _name(key: object) -> str:
    """A user's mapping key as it may appear in a key path (long keys cut)."""
    return _clip(key, 40) if isinstance(key, str) else show(key, 40)


class SearchSpaceError(AutopruneError, ValueError):
    """A search-space file is missing or invalid: the message names the file, the key
    and what is allowed."""


class Section(dict):
    """A validated mapping whose keys also read as attributes (``proxy.lr`` or ``proxy["lr"]``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def stage_of(unit: str) -> str:
    """The stage a unit belongs to: its dotted name up to and including the first
    component that contains a digit; the whole name if none does.

    ``layer2.0.conv1`` → ``layer2`` (CIFAR and torchvision ResNets), ``conv1`` → ``conv1``
    (the stem is its own stage), ``features.3`` → ``features.3`` (VGG: every conv),
    ``features.2.0.block.0.0`` → ``features.2`` (MobileNet/EfficientNet blocks),
    ``features.denseblock1.denselayer2.conv1`` → ``features.denseblock1``.
    """
    parts = unit.split(".")
    for i, part in enumerate(parts):
        if any(c.isdigit() for c in part):
            return ".".join(parts[: i + 1])
    return unit


def _gp_multiobjective() -> bool:
    """Optuna's GPSampler handles several objectives from v4.4 on."""
    major, minor = (int(x) for x in re.findall(r"\d+", optuna.__version__)[:2])
    return (major, minor) >= (4, 4)


def multiobjective_samplers() -> tuple[str, ...]:
    return ("tpe", "nsga2", "random") + (("gp",) if _gp_multiobjective() else ())


def _sampler_class(name: str) -> type:
    s = optuna.samplers
    return {"tpe": s.TPESampler, "nsga2": s.NSGAIISampler, "cmaes": s.CmaEsSampler,
            "gp": s.GPSampler, "random": s.RandomSampler}[name]


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


def _sampler_args(cls: type) -> dict[str, tuple[str, ...] | str]:
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


def _sampler_value(c: "_Checker", key: str, value: object, kinds: tuple[str, ...], what: str) -> None:
    """SearchSpaceError unless ``value`` is one of ``kinds`` (and within the bounds)."""
    name = key.rsplit(".", 1)[1]
    low, high, low_open = _SAMPLER_BOUNDS.get(name, (None, None, False))
    if value is None and "None" in kinds:
        return
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
        raise c.fail(key, f"must be {' or '.join(names[k] for k in kinds)} ({what})", value)
    if low is None or high is None:
        return
    if value > high or value < low or (low_open and value == low):
        raise c.fail(key, f"must be in {'(' if low_open else '['}{low:g}, {high:g}] ({what})", value)


def _suggest(options: Sequence[str], value: object) -> str:
    if not isinstance(value, str) or len(value) > 100:
        return ""
    near = difflib.get_close_matches(value, list(options), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _is_number(value: object) -> bool:
    """An int or a finite float (not a bool); never converts a huge int to float."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _repeats_at(pattern: str, i: int) -> bool:
    """Whether a quantifier that repeats without bound (or more than once) starts at ``i``."""
    if i >= len(pattern):
        return False
    if pattern[i] in "*+":
        return True
    m = re.match(r"\{(\d*)(,?)(\d*)\}", pattern[i:])
    if m is None or not (m[1] or m[3]):
        return False
    if m[2]:
        return not m[3] or int(m[3]) > 1
    return int(m[1]) > 1


def _unbounded_at(pattern: str, i: int) -> bool:
    return pattern[i] in "*+" or re.match(r"\{\d*,\}", pattern[i:]) is not None


def _regex_hazard(pattern: str) -> str | None:
    """Why matching ``pattern`` could take exponential (or high-polynomial) time, or None:
    a repeated group holding a repeat (``(a+)+``), or too many unbounded repeats."""
    inner = [False]  # per open group: does it hold a repeat?
    unbounded, i, n = 0, 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[":  # a character class: skip to its closing bracket
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":
                i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
            continue
        if ch == "(":
            inner.append(False)
            i += 2 if pattern[i + 1:i + 2] == "?" else 1  # (?:, (?P<..>: not a quantifier
            continue
        if ch == ")" and len(inner) > 1:
            held = inner.pop()
            if held and _repeats_at(pattern, i + 1):
                return "a repeated group holds a repeat, like (a+)+"
            inner[-1] = inner[-1] or held
        elif _repeats_at(pattern, i) and i > 0:
            inner[-1] = True
        if i > 0 and _unbounded_at(pattern, i):
            unbounded += 1
        i += 1
    if unbounded > MAX_REPEATS:
        return f"it has {unbounded} unbounded repeats (*, +, {{n,}}); at most {MAX_REPEATS}"
    return None


# ----------------------------------------------------------------------------- validation

class _Checker:
    """Builds errors that name the file, the key path and what is allowed."""

    def __init__(self, label: str) -> None:
        self.label = label

    def fail(self, key: str, what: str, got: object = _NO_VALUE) -> SearchSpaceError:
        """The error; ``got`` (a user's value) is shown by :func:`show`, never in full."""
        text = f"{self.label}: {key}: {what}" if key else f"{self.label}: {what}"
        if got is not _NO_VALUE:
            text += f", got {show(got)}"
        return SearchSpaceError(text)

    def mapping(self, value: object, key: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(key, "must be a mapping (key: value lines)", value)
        for k in value:
            if not isinstance(k, str):
                raise self.fail(key, "keys must be strings", k)
        return value

    def keys(self, value: dict, allowed: Sequence[str], prefix: str) -> None:
        for k in value:
            if k not in allowed:
                raise self.fail(prefix + _name(k), f"unknown key{_suggest(allowed, k)} "
                                f"(allowed: {', '.join(allowed)})")

    def items(self, value: list, key: str, limit: int, what: str) -> list:
        if len(value) > limit:
            raise self.fail(key, f"has {len(value)} {what}; at most {limit} are allowed")
        return value

    def number(self, value: object, key: str, low: float, high: float, *, low_open: bool = False,
               high_open: bool = False) -> float:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        if not _is_number(value):
            raise self.fail(key, f"must be a number in {interval}", value)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise self.fail(key, f"must be a number in {interval}", value)
        return float(value)

    def integer(self, value: object, key: str, low: int, high: int = MAX_STEPS) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(key, f"must be an integer >= {low} (at most {high:,})", value)
        return int(value)

    def positive(self, value: object, key: str, high: float = 1e6) -> float:
        if not _is_number(value) or not 0 < value <= high:
            raise self.fail(key, f"must be a positive number (at most {high:g})", value)
        return float(value)

    def choices(self, value: object, key: str) -> list[int]:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self.fail(key, f"must be a non-empty list of integers in 1..{MAX_K}, e.g. [2, 4, 8]",
                            value)
        self.items(value, key, MAX_CHOICES, "choices")
        out = [self.integer(v, f"{key}[{i}]", 1, MAX_K) for i, v in enumerate(value)]
        if len(set(out)) != len(out):
            raise self.fail(key, "choices must be distinct", value)
        return out

    def interval(self, value: object, key: str, low: float, high: float) -> tuple[float, float]:
        if not isinstance(value, list) or len(value) != 2:
            raise self.fail(key, f"must be [low, high] with {low:g} <= low <= high <= {high:g}", value)
        lo = self.number(value[0], f"{key}[0]", low, high)
        hi = self.number(value[1], f"{key}[1]", low, high)
        if lo > hi:
            raise self.fail(key, f"low {lo:g} exceeds high {hi:g}; write [low, high]", value)
        return lo, hi

    def regex(self, value: object, key: str) -> re.Pattern:
        if not isinstance(value, str):
            raise self.fail(key, "must be a regular expression (a string; quote it with '...')", value)
        if len(value) > MAX_REGEX:
            raise self.fail(key, f"is a regular expression of {len(value)} characters; at most "
                            f"{MAX_REGEX} are allowed")
        try:
            compiled = re.compile(value)
        except (re.error, OverflowError, RecursionError) as exc:
            raise self.fail(key, f"is not a valid regular expression ({_clip(str(exc), 80)})",
                            value) from None
        hazard = _regex_hazard(value)
        if hazard:
            raise self.fail(key, f"could take exponential time to match: {hazard}; write a "
                            "simpler regex", value)
        return compiled

    def tie(self, value: object, key: str) -> str:
        allowed = "unit, stage, all, or a regex with one capture group such as 'layer(\\d+)'"
        if not isinstance(value, str):
            raise self.fail(key, f"must be {allowed}", value)
        if value in TIES:
            return value
        if self.regex(value, key).groups != 1:
            raise self.fail(key, f"must be {allowed}{_suggest(TIES, value)}", value)
        return value


def _parse_ratios(c: _Checker, value: object, max_ratio: float) -> list[Section]:
    if not isinstance(value, list) or not value:
        raise c.fail("ratios", "must be a non-empty list of rules "
                     "{match: REGEX, low: 0.0, high: 0.8, tie: unit|stage|all|REGEX}", value)
    c.items(value, "ratios", MAX_RULES, "rules")
    rules = []
    for i, rule in enumerate(value):
        key = f"ratios[{i}]"
        rule = c.mapping(rule, key)
        c.keys(rule, ("match", "low", "high", "tie"), key + ".")
        if "high" not in rule:
            raise c.fail(f"{key}.high", "is required: the largest prune ratio, a number in [0, 1)")
        low = c.number(rule.get("low", 0.0), f"{key}.low", 0.0, 1.0, high_open=True)
        high = c.number(rule["high"], f"{key}.high", 0.0, 1.0, high_open=True)
        if low > high:
            raise c.fail(f"{key}.low", f"must not exceed high ({high:g})", low)
        if high > max_ratio:
            raise c.fail(f"{key}.high", f"must be at most max_ratio ({max_ratio:g})", high)
        match = rule.get("match", ".*")
        c.regex(match, f"{key}.match")
        rules.append(Section(match=match, low=low, high=high,
                             tie=c.tie(rule.get("tie", "unit"), f"{key}.tie")))
    return rules


def _parse_clusters(c: _Checker, value: object) -> Section | None:
    if value is None:
        return None
    value = c.mapping(value, "clusters")
    c.keys(value, ("method", "k", "tie"), "clusters.")
    method = value.get("method")
    if method not in CLUSTER_METHODS:
        raise c.fail("clusters.method", f"must be one of {', '.join(CLUSTER_METHODS)}"
                     f"{_suggest(CLUSTER_METHODS, method)}", method)
    if "k" in value:
        k = c.choices(value["k"], "clusters.k")
    elif method == "hpse":
        k = None  # the calibration default (width // 16 per unit)
    else:
        raise c.fail("clusters.k", f"is required for method {method}: cluster-count choices, "
                     "e.g. [2, 4, 8]")
    if method == "hpse" and k is not None and len(k) != 1:
        raise c.fail("clusters.k", "hpse fixes the cluster count at calibration: give one "
                     "choice, e.g. [4]", value["k"])
    return Section(method=method, k=k, tie=c.tie(value.get("tie", "unit"), "clusters.tie"))


def _parse_criteria(c: _Checker, value: object) -> list[str]:
    from .. import criteria as _criteria
    available = [n for n in _criteria.available() if n not in NOT_IN_SEARCH]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise c.fail("criteria", f"must be a non-empty list of criterion names "
                     f"(available: {', '.join(available)})", value)
    c.items(value, "criteria", len(available), "names")
    for i, name in enumerate(value):
        if isinstance(name, str) and name in NOT_IN_SEARCH:
            raise c.fail(f"criteria[{i}]", f"{name} is not yet available in search spaces: "
                         f"{NOT_IN_SEARCH[name]} (available: {', '.join(available)})")
        if name not in available:
            raise c.fail(f"criteria[{i}]", f"unknown criterion{_suggest(available, name)} "
                         f"(available: {', '.join(available)})", name)
    if len(set(value)) != len(value):
        raise c.fail("criteria", "names must be distinct", value)
    return list(value)


def _parse_selfgroup(c: _Checker, value: object) -> Section | None:
    if value is None:
        return None
    value = c.mapping(value, "selfgroup")
    c.keys(value, ("k", "cp"), "selfgroup.")
    for key, what in (("k", "group-count choices, e.g. [4, 8, 16]"),
                      ("cp", "[low, high], the range of the connection-pruning fraction in [0, 1]")):
        if key not in value:
            raise c.fail(f"selfgroup.{key}", f"is required: {what}")
    return Section(k=c.choices(value["k"], "selfgroup.k"), cp=c.interval(value["cp"], "selfgroup.cp", 0.0, 1.0))


def _parse_proxy(c: _Checker, value: object) -> Section:
    value = c.mapping({} if value is None else value, "proxy")
    c.keys(value, tuple(PROXY_DEFAULTS), "proxy.")
    v = {**PROXY_DEFAULTS, **value}
    return Section(bn_batches=c.integer(v["bn_batches"], "proxy.bn_batches", 0),
                   finetune_steps=c.integer(v["finetune_steps"], "proxy.finetune_steps", 0),
                   eval_batches=c.integer(v["eval_batches"], "proxy.eval_batches", 1),
                   lr=c.positive(v["lr"], "proxy.lr", 100.0))


def _parse_sampler(c: _Checker, value: object, objective: str) -> Section:
    if value is None:
        value = {"name": "tpe"}
    if isinstance(value, str):
        value = {"name": value}
    value = dict(c.mapping(value, "sampler"))
    name = value.pop("name", "tpe")
    if name not in SAMPLERS:
        raise c.fail("sampler.name", f"must be one of {', '.join(SAMPLERS)}{_suggest(SAMPLERS, name)}", name)
    if objective == "accuracy_flops" and name not in multiobjective_samplers():
        raise c.fail("sampler.name", f"{name} cannot optimise two objectives (objective "
                     f"accuracy_flops); use one of {', '.join(multiobjective_samplers())}", name)
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise c.fail("sampler.name", "cmaes needs the 'cmaes' package (pip install cmaes); "
                     f"without it use one of {', '.join(s for s in SAMPLERS if s != 'cmaes')}", name)
    cls = _sampler_class(name)
    if "seed" in value:
        raise c.fail("sampler.seed", "the sampler's seed comes from the run (seed=/--seed), "
                     "not from the search space")
    args = _sampler_args(cls)
    settable = [a for a, kinds in args.items() if isinstance(kinds, tuple)]
    allowed = ", ".join(["name", *settable])
    for key, arg in value.items():
        kinds = args.get(key)
        if isinstance(kinds, str):
            raise c.fail(f"sampler.{key}", f"takes a Python object ({_clip(kinds, 50)}) that YAML "
                         f"cannot write (allowed: {allowed})")
        if kinds is None:
            raise c.fail(f"sampler.{_name(key)}", f"unknown argument of optuna's {cls.__name__}"
                         f"{_suggest(settable, key)} (allowed: {allowed})")
        _sampler_value(c, f"sampler.{key}", arg, kinds, f"{cls.__name__}'s {key}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(seed=0, **value)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the key
        raise c.fail("sampler", f"optuna's {cls.__name__} rejects these settings "
                     f"({type(exc).__name__}: {_clip(str(exc), 100)})", value) from None
    return Section(name=name, **value)


def _parse_asha(c: _Checker, value: object) -> Section | None:
    if value is None:
        return None
    value = c.mapping(value, "asha")
    c.keys(value, tuple(ASHA_DEFAULTS), "asha.")
    v = {**ASHA_DEFAULTS, **value}
    factor = c.number(v["reduction_factor"], "asha.reduction_factor", 1.0, 1000.0, low_open=True)
    return Section(grace_period=c.integer(v["grace_period"], "asha.grace_period", 1),
                   reduction_factor=factor)


# ----------------------------------------------------------------------------- variables

@dataclass(frozen=True)
class _Var:
    """One Optuna variable (or, with a single value, a constant that is not suggested)."""

    name: str
    kind: str  # "ratio", "k", "w", "sg_k", "sg_cp", "scale"
    units: tuple[str, ...]
    low: float = 0.0
    high: float = 0.0
    choices: tuple[int, ...] = ()

    @property
    def fixed(self) -> bool:
        return len(self.choices) == 1 if self.choices else self.low == self.high

    def constant(self):
        return self.choices[0] if self.choices else self.low

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high)

    def read(self, params: Mapping[str, Any], label: str) -> Any:
        if self.fixed:
            return self.constant()
        if self.name not in params:
            have = sorted(map(str, params))
            raise SearchSpaceError(f"{label}: the trial's params lack variable {self.name!r} "
                                   f"(have: {', '.join(have[:8]) or 'none'}"
                                   f"{f' and {len(have) - 8} more' if len(have) > 8 else ''})")
        value = params[self.name]
        if self.choices:
            if value not in self.choices:
                raise SearchSpaceError(f"{label}: {self.name} must be one of {list(self.choices)}, "
                                       f"got {show(value)}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SearchSpaceError(f"{label}: {self.name} must be a number, got {show(value)}")
        return min(self.high, max(self.low, float(value)))  # guards float noise only


class _Define:
    """The define-by-run function: suggests every variable of a fixed list, in order.
    A class rather than a closure so Ray Tune can pickle the searcher holding it."""

    def __init__(self, variables: list[_Var]) -> None:
        self.variables = [v for v in variables if not v.fixed]

    def __call__(self, trial) -> None:
        for var in self.variables:
            var.suggest(trial)
        return None


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Ray Tune hands the define-by-run config back nested at '/' ({"ratio": {"layer2": ..}})."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- public API

@dataclass
class Candidate:
    """One proposed structure before fitting: feed ``ratios`` to ``Space.fit`` with
    :meth:`budget`, score with ``mix``, cluster with ``cluster_method``/``cluster_k``,
    then self-group with ``selfgroup`` (``{"k", "cp"}``) if set.

    ``budget_scale`` is 1 except for objective ``accuracy_flops``, where it is the
    fraction of the run's budget this candidate is fitted to.
    """

    ratios: dict[str, float]
    cluster_method: str | None
    cluster_k: dict[str, int] | None
    mix: dict[str, float]
    selfgroup: dict | None
    budget_scale: float = 1.0

    def budget(self, budget: Budget) -> Budget:
        """``budget`` scaled by ``budget_scale`` (unchanged when it is 1)."""
        if self.budget_scale == 1.0:
            return budget
        return Budget(budget.kind, budget.value * self.budget_scale, budget.relative)

    def as_dict(self) -> dict:
        """A JSON-ready copy (for report.json)."""
        return dataclasses.asdict(self)


@dataclass
class SearchSpace:
    """A validated search space; see the module doc for the meaning of each field."""

    name: str
    path: Path | None
    ratios: list[Section]
    criteria: list[str]
    max_ratio: float = 0.9
    clusters: Section | None = None
    selfgroup: Section | None = None
    proxy: Section = field(default_factory=lambda: Section(PROXY_DEFAULTS))
    sampler: Section = field(default_factory=lambda: Section(name="tpe"))
    objective: str = "accuracy"
    budget_scale: tuple[float, float] | None = None
    asha: Section | None = None
    description: str = ""
    label: str = field(default="", repr=False, compare=False)  # how errors name the file

    def __post_init__(self) -> None:
        self.label = self.label or (str(self.path) if self.path else f"{self.name}.yaml")

    # -- construction

    @classmethod
    def from_dict(cls, data: object, name: str = "<dict>", path: Path | None = None,
                  label: str | None = None) -> "SearchSpace":
        """Validate a parsed YAML document; errors name ``label`` (default ``name``)."""
        c = _Checker(label or name)
        if data is None:
            raise c.fail("", "the file is empty; it needs at least 'ratios' and 'criteria'")
        data = c.mapping(data, "top level")
        c.keys(data, TOP_KEYS, "")
        for key in ("ratios", "criteria"):
            if key not in data:
                raise c.fail(key, "is required" + (
                    ": a list of rules {match, low, high, tie}" if key == "ratios"
                    else ": a list of criterion names, e.g. [di, l1]"))
        max_ratio = c.number(data.get("max_ratio", 0.9), "max_ratio", 0.0, 1.0,
                             low_open=True, high_open=True)
        objective = data.get("objective", "accuracy")
        if objective not in OBJECTIVES:
            raise c.fail("objective", f"must be one of {', '.join(OBJECTIVES)}"
                         f"{_suggest(OBJECTIVES, objective)}", objective)
        scale = None
        if objective == "accuracy_flops":
            raw = data.get("budget_scale", list(BUDGET_SCALE_DEFAULT))
            scale = c.interval(raw, "budget_scale", 0.0, 1.0)
            if scale[0] <= 0:
                raise c.fail("budget_scale[0]", "must be a number in (0, 1]", raw[0])
        elif "budget_scale" in data:
            raise c.fail("budget_scale", "only applies to objective accuracy_flops")
        description = data.get("description", "")
        if description is None:
            description = ""
        if not isinstance(description, str):
            raise c.fail("description", "must be a string", description)
        proxy, asha = _parse_proxy(c, data.get("proxy")), _parse_asha(c, data.get("asha"))
        if asha is not None and asha.grace_period > proxy.finetune_steps:
            raise c.fail("asha.grace_period", f"must not exceed proxy.finetune_steps "
                         f"({proxy.finetune_steps}): ASHA counts proxy fine-tuning steps",
                         asha.grace_period)
        return cls(
            name=name, path=path, description=description,
            ratios=_parse_ratios(c, data["ratios"], max_ratio), max_ratio=max_ratio,
            clusters=_parse_clusters(c, data.get("clusters")),
            criteria=_parse_criteria(c, data["criteria"]),
            selfgroup=_parse_selfgroup(c, data.get("selfgroup")),
            proxy=proxy, sampler=_parse_sampler(c, data.get("sampler"), objective),
            objective=objective, budget_scale=scale, asha=asha, label=c.label)

    # -- variables

    def _key(self, tie: str, unit: str, key: str) -> str:
        if tie == "unit":
            return unit
        if tie == "stage":
            return stage_of(unit)
        if tie == "all":
            return "all"
        m = re.search(tie, unit)
        if m is None or m.group(1) is None:
            raise SearchSpaceError(f"{self.label}: {key}: the tie regex {tie!r} must capture a "
                                   f"key from every unit it covers; it does not match {unit!r}")
        return m.group(1)

    def _rule_of(self, unit: str) -> int | None:
        for i, rule in enumerate(self.ratios):
            if re.search(rule.match, unit):
                return i
        return None

    def _variables(self, space) -> list[_Var]:
        """Every variable, constants included, in suggestion order."""
        names = [u.name for u in space.units]
        out: list[_Var] = []
        groups: dict[tuple[int, str], list[str]] = {}
        for unit in names:
            i = self._rule_of(unit)
            if i is not None:
                groups.setdefault((i, self._key(self.ratios[i].tie, unit, f"ratios[{i}].tie")), []).append(unit)
        taken: dict[str, int] = {}
        for (i, key), units in groups.items():
            name = f"ratio/{key}"
            if taken.get(name, i) != i:
                name = f"{name}~{i}"
            taken.setdefault(name, i)
            rule = self.ratios[i]
            out.append(_Var(name, "ratio", tuple(units), low=rule.low, high=rule.high))
        if self.clusters is not None and self.clusters.k is not None:
            kgroups: dict[str, list[str]] = {}
            for unit in names:
                kgroups.setdefault(self._key(self.clusters.tie, unit, "clusters.tie"), []).append(unit)
            out += [_Var(f"k/{key}", "k", tuple(units), choices=tuple(self.clusters.k))
                    for key, units in kgroups.items()]
        if len(self.criteria) > 1:
            out += [_Var(f"w/{c}", "w", tuple(names), low=0.0, high=1.0) for c in self.criteria]
        if self.selfgroup is not None:
            out.append(_Var("sg/k", "sg_k", tuple(names), choices=tuple(self.selfgroup.k)))
            out.append(_Var("sg/cp", "sg_cp", tuple(names), *self.selfgroup.cp))
        if self.budget_scale is not None:
            out.append(_Var("budget/scale", "scale", tuple(names), *self.budget_scale))
        return out

    def variables(self, space) -> dict[str, list[str]]:
        """Optuna variable name → the units it controls, in suggestion order.

        Ratio and k variables control their tie group; the global ones (``w/*``,
        ``sg/*``, ``budget/scale``) list every unit. Constants (a rule with ``low ==
        high``, a single k choice) are not variables and are left out.
        """
        return {v.name: list(v.units) for v in self._variables(space) if not v.fixed}

    def define(self, space) -> Callable[[Any], None]:
        """The define-by-run function for ``OptunaSearch(space=...)`` or ``study.ask()``:
        ``suggest_float`` for ratios, weights, ``sg/cp`` and ``budget/scale``,
        ``suggest_categorical`` for ``k/*`` and ``sg/k``. Picklable; returns None."""
        return _Define(self._variables(space))

    def candidate(self, params: Mapping[str, Any], space) -> Candidate:
        """The structure a trial's params describe (flat Optuna names or Ray's nested config).

        Weights are normalised to sum 1; if all are 0, every criterion gets an equal
        weight. Units no ratio rule matches get ratio 0. Keys other than the
        variables are ignored.
        """
        flat = _flatten(params)
        ratios = {u.name: 0.0 for u in space.units}
        cluster_k: dict[str, int] | None = None
        weights: dict[str, float] = {}
        sg: dict[str, Any] = {}
        scale = 1.0
        for var in self._variables(space):
            value = var.read(flat, self.label)
            if var.kind == "ratio":
                ratios.update({u: float(value) for u in var.units})
            elif var.kind == "k":
                cluster_k = cluster_k or {}
                cluster_k.update({u: int(value) for u in var.units})
            elif var.kind == "w":
                weights[var.name[2:]] = float(value)
            elif var.kind == "sg_k":
                sg["k"] = int(value)
            elif var.kind == "sg_cp":
                sg["cp"] = float(value)
            elif var.kind == "scale":
                scale = float(value)
        if len(self.criteria) == 1:
            mix = {self.criteria[0]: 1.0}
        else:
            total = sum(weights.values())
            mix = ({c: weights[c] / total for c in self.criteria} if total > 0
                   else {c: 1.0 / len(self.criteria) for c in self.criteria})
        return Candidate(ratios=ratios, cluster_method=self.clusters.method if self.clusters else None,
                         cluster_k=cluster_k, mix=mix, selfgroup=sg or None, budget_scale=scale)

    def params_for(self, ratios: Mapping[str, float], space) -> dict[str, Any]:
        """Params (flat Optuna names) placing a known structure in this space, e.g. to
        enqueue the uniform and greedy baselines as the first trials.

        Each ratio variable is the mean of its units' ratios (missing units: 0), clipped
        into [low, high]. The rest take defaults: the first k choice, equal weights
        (0.5 each), the first ``sg/k`` choice, the middle of ``cp`` and ``budget/scale``
        = its high end (the full budget).
        """
        for name in ratios:
            space.unit(name)
        out: dict[str, Any] = {}
        for var in self._variables(space):
            if var.fixed:
                continue
            if var.kind == "ratio":
                mean = sum(float(ratios.get(u, 0.0)) for u in var.units) / len(var.units)
                out[var.name] = min(var.high, max(var.low, mean))
            elif var.choices:
                out[var.name] = var.choices[0]
            elif var.kind == "w":
                out[var.name] = 0.5
            elif var.kind == "sg_cp":
                out[var.name] = (var.low + var.high) / 2
            elif var.kind == "scale":
                out[var.name] = var.high
        return out

    # -- run settings

    def make_sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        """The configured Optuna sampler, seeded with ``seed``."""
        kwargs = {k: v for k, v in self.sampler.items() if k != "name"}
        cls = _sampler_class(self.sampler.name)
        try:
            return cls(seed=seed, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised naming the key
            raise SearchSpaceError(f"{self.label}: sampler: optuna's {cls.__name__} rejects "
                                   f"{show(kwargs)} ({type(exc).__name__}: {_clip(str(exc), 100)})") from None

    def metrics(self) -> tuple[list[str], list[str]]:
        """Metric names and modes for Ray Tune / the Optuna study directions."""
        if self.objective == "accuracy_flops":
            return ["proxy_score", "flops"], ["max", "min"]
        return ["proxy_score"], ["max"]

    def as_dict(self) -> dict:
        """The validated settings as plain JSON-ready data (for report.json)."""
        def plain(x):
            if isinstance(x, Mapping):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x
        return {"name": self.name, "path": str(self.path) if self.path else None,
                **{k: plain(getattr(self, k)) for k in TOP_KEYS}}


def packaged() -> list[str]:
    """Names of the search spaces shipped in ``autoprune/search_spaces``."""
    root = importlib.resources.files("autoprune") / _PACKAGE_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _resolve(path_or_name: "str | Path") -> tuple[Path, str, str]:
    """(file, name, label for errors): a path to a file, else a packaged name, given
    bare (``resnet_cifar``), with ``.yaml``, or as ``search_spaces/NAME.yaml``."""
    p = Path(path_or_name)
    if p.is_file():
        return p, p.stem, str(path_or_name)
    names = packaged()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if (len(p.parts) == 1 or p.parent.name == _PACKAGE_DIR) and stem in names:
        root = importlib.resources.files("autoprune") / _PACKAGE_DIR
        return Path(str(root / f"{stem}.yaml")), stem, f"{stem}.yaml"
    what = ("is a directory, not a file" if p.is_dir() else
            "is not a regular file" if p.exists() else "no such file")
    raise SearchSpaceError(f"{path_or_name}: {what}; give a YAML file or a packaged search space "
                           f"({', '.join(names)}){_suggest(names, stem)}")


class _Refused(Exception):
    """YAML that parses but that a search space refuses (aliases, depth, repeated keys)."""

    def __init__(self, mark, text: str) -> None:
        super().__init__(text)
        self.mark, self.text = mark, text


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases (an alias bomb of a few hundred
    bytes expands to billions of values), nested at most :data:`MAX_DEPTH` deep, with at
    most :data:`MAX_NODES` values (it stops reading there: the pure-Python parser takes
    seconds for a megabyte of short values), and refusing a key given twice in one
    mapping (safe_load silently keeps the last)."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark, "YAML anchors and aliases (&name, *name) are not "
                           "allowed in search spaces; write the values out")
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                raise _Refused(event.start_mark, f"holds more than {MAX_NODES:,} values; a search "
                               "space needs a few dozen")
            if self._depth > MAX_DEPTH + 1:  # +1: the document's top-level node
                raise _Refused(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set[str] = set()
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise _Refused(key.start_mark, f"key {_name(key.value)!r} appears twice "
                                       "in one mapping")
                    seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path, label: str) -> str:
    """The file's text: at most :data:`MAX_FILE_BYTES`, UTF-8, no NUL bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SearchSpaceError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SearchSpaceError(f"{label}: is larger than {MAX_FILE_BYTES >> 20} MiB; a search space "
                               "is a small YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SearchSpaceError(f"{label}: is not a UTF-8 text YAML file (byte "
                               f"0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8)") from None
    if "\x00" in text:
        raise SearchSpaceError(f"{label}: is not a UTF-8 text YAML file (it holds NUL bytes at "
                               f"offset {text.index(chr(0))})")
    return text


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def load(path_or_name: "str | Path") -> SearchSpace:
    """Load and validate a search space: a YAML file, or a packaged name
    (``resnet_cifar``, ``vgg_cifar``, ``generic``; ``.yaml`` optional). A file that
    exists wins over a packaged name."""
    path, name, label = _resolve(path_or_name)
    text = _read_text(path, label)
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise SearchSpaceError(f"{label}: {_where(exc.mark)}{exc.text}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SearchSpaceError(f"{label}: {_where(mark)}not valid YAML ({_clip(problem, 100)}); "
                               "regexes are safest in single quotes") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. int('9' * 5000), a bad date
        raise SearchSpaceError(f"{label}: a value is not valid YAML ({type(exc).__name__}: "
                               f"{_clip(str(exc), 100)})") from None
    return SearchSpace.from_dict(data, name=name, path=path, label=label)
