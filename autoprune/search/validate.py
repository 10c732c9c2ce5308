"""Validating a parsed search-space document into the settings of a SearchSpace.

Validate once, at the entry point: every section is checked by its own parser (ratios,
clusters, criteria, selfgroup, proxy, sampler, asha) against the caps below (rules, choices,
steps, regex length and repeats, so matching unit names cannot take exponential time), and the
first problem is one SearchSpaceError naming the file, the key path and what is allowed.
"""

from __future__ import annotations

import importlib.util
import math
import re
import warnings
from typing import Any, Sequence

from ..errors import clip, short
from ..grouping import METHODS as CLUSTER_METHODS
from .samplers import SAMPLERS, build, multiobjective_samplers, sampler_args, sampler_class, value_problem
from .space_error import SearchSpaceError, did_you_mean, key_name

__all__ = ["ASHA_DEFAULTS", "BUDGET_SCALE_DEFAULT", "MAX_CHOICES", "MAX_K", "MAX_REGEX", "MAX_REPEATS",
           "MAX_RULES", "MAX_STEPS", "NOT_IN_SEARCH", "OBJECTIVES", "PROXY_DEFAULTS", "Section", "TIES",
           "TOP_KEYS", "parse_document"]

OBJECTIVES = ("accuracy", "accuracy_flops")
TIES = ("unit", "stage", "all")
PROXY_DEFAULTS = {"bn_batches": 20, "finetune_steps": 50, "eval_batches": 4, "lr": 0.01}
ASHA_DEFAULTS = {"grace_period": 1, "reduction_factor": 4}
BUDGET_SCALE_DEFAULT = (0.5, 1.0)
TOP_KEYS = ("description", "ratios", "max_ratio", "clusters", "criteria", "selfgroup", "proxy",
            "sampler", "objective", "budget_scale", "asha")
NOT_IN_SEARCH: dict[str, str] = {}
"""Criteria a search space may not name, with the reason. None now: the driver computes what a
criterion requires besides calibration summaries (fpar's attention) with its
``Criterion.inputs`` (:func:`autoprune.search.runner.driver_state`)."""
MAX_RULES = 256            # ratio rules
MAX_CHOICES = 64           # k choices (clusters, selfgroup)
MAX_K = 4096               # a cluster / group count (clamped to the unit's width anyway)
MAX_STEPS = 1_000_000      # proxy batch/step counts, asha.grace_period
MAX_REGEX = 200            # characters
MAX_REPEATS = 5            # unbounded repeats (*, +, {n,}) in one regex
_NO_VALUE = object()


class Section(dict):
    """A validated mapping whose keys also read as attributes (``proxy.lr`` or ``proxy["lr"]``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


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
        """The error; ``got`` (a user's value) is shown by :func:`~autoprune.errors.short`, never in full."""
        text = f"{self.label}: {key}: {what}" if key else f"{self.label}: {what}"
        if got is not _NO_VALUE:
            text += f", got {short(got)}"
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
                raise self.fail(prefix + key_name(k), f"unknown key{did_you_mean(allowed, k)} "
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
            raise self.fail(key, f"is not a valid regular expression ({clip(str(exc), 80)})",
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
            raise self.fail(key, f"must be {allowed}{did_you_mean(TIES, value)}", value)
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
                     f"{did_you_mean(CLUSTER_METHODS, method)}", method)
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
            raise c.fail(f"criteria[{i}]", f"unknown criterion{did_you_mean(available, name)} "
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
        raise c.fail("sampler.name", f"must be one of {', '.join(SAMPLERS)}{did_you_mean(SAMPLERS, name)}", name)
    if objective == "accuracy_flops" and name not in multiobjective_samplers():
        raise c.fail("sampler.name", f"{name} cannot optimise two objectives (objective "
                     f"accuracy_flops); use one of {', '.join(multiobjective_samplers())}", name)
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise c.fail("sampler.name", "cmaes needs the 'cmaes' package (pip install cmaes); "
                     f"without it use one of {', '.join(s for s in SAMPLERS if s != 'cmaes')}", name)
    cls = sampler_class(name)
    if "seed" in value:
        raise c.fail("sampler.seed", "the sampler's seed comes from the run (seed=/--seed), "
                     "not from the search space")
    args = sampler_args(cls)
    settable = [a for a, kinds in args.items() if isinstance(kinds, tuple)]
    allowed = ", ".join(["name", *settable])
    for key, arg in value.items():
        kinds = args.get(key)
        if isinstance(kinds, str):
            raise c.fail(f"sampler.{key}", f"takes a Python object ({clip(kinds, 50)}) that YAML "
                         f"cannot write (allowed: {allowed})")
        if kinds is None:
            raise c.fail(f"sampler.{key_name(key)}", f"unknown argument of optuna's {cls.__name__}"
                         f"{did_you_mean(settable, key)} (allowed: {allowed})")
        problem = value_problem(key, arg, kinds, f"{cls.__name__}'s {key}")
        if problem:
            raise c.fail(f"sampler.{key}", problem, arg)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(name, value, 0)
    except Exception as exc:  # noqa: BLE001 - re-raised naming the key
        raise c.fail("sampler", f"optuna's {cls.__name__} rejects these settings "
                     f"({type(exc).__name__}: {clip(str(exc), 100)})", value) from None
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



def parse_document(data: object, label: str) -> dict[str, Any]:
    """The settings of a SearchSpace (every field but ``name``, ``path`` and ``label``) that a
    parsed YAML document describes; SearchSpaceError naming ``label`` at the first problem."""
    c = _Checker(label)
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
                     f"{did_you_mean(OBJECTIVES, objective)}", objective)
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
    return dict(
        description=description,
        ratios=_parse_ratios(c, data["ratios"], max_ratio), max_ratio=max_ratio,
        clusters=_parse_clusters(c, data.get("clusters")),
        criteria=_parse_criteria(c, data["criteria"]),
        selfgroup=_parse_selfgroup(c, data.get("selfgroup")),
        proxy=proxy, sampler=_parse_sampler(c, data.get("sampler"), objective),
        objective=objective, budget_scale=scale, asha=asha)
