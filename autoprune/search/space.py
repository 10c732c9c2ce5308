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
    weight ``w/<name>`` in [:data:`WEIGHT_LOW`, 1] = [0.05, 1], never 0, so the sum is
    positive and the candidate's mix (the weights divided by their sum) always passes
    :func:`autoprune.criteria.check_weights`; a criterion can weigh at most 20× another.
    One name is weight 1, no variable.
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

This module holds the validated :class:`SearchSpace` and its define-by-run variables; the
file is read by :mod:`.yaml_file`, checked by :mod:`.validate` and the sampler's arguments
typed by :mod:`.samplers` (imports flow that way: space → validate → samplers).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna

from ..budget import Budget
from ..errors import clip, short as show
# Besides its own names, this module still offers those it held before validate, samplers and
# yaml_file were split out of it (the caps, defaults, Section, show, multiobjective_samplers).
from .samplers import MAX_SAMPLER_INT, SAMPLERS, build, multiobjective_samplers, sampler_class  # noqa: F401
from .space_error import SearchSpaceError
from .validate import (ASHA_DEFAULTS, BUDGET_SCALE_DEFAULT, MAX_CHOICES, MAX_K, MAX_REGEX,  # noqa: F401
                       MAX_REPEATS, MAX_RULES, MAX_STEPS, NOT_IN_SEARCH, OBJECTIVES, PROXY_DEFAULTS, TIES,
                       TOP_KEYS, Section, parse_document)
from .yaml_file import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, packaged, read_yaml, resolve  # noqa: F401

__all__ = ["Candidate", "OBJECTIVES", "SAMPLERS", "SearchSpace", "SearchSpaceError", "WEIGHT_LOW", "load",
           "packaged", "stage_of"]

WEIGHT_LOW = 0.05
"""The smallest mix weight a search samples (``w/<name>`` is in [WEIGHT_LOW, 1]): strictly
positive, so an all-zero mix, which :func:`autoprune.criteria.check_weights` refuses,
cannot arise."""


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
        label = label or name
        return cls(name=name, path=path, label=label, **parse_document(data, label))

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
            out += [_Var(f"w/{c}", "w", tuple(names), low=WEIGHT_LOW, high=1.0) for c in self.criteria]
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

        Weights are normalised to sum 1 (each is at least :data:`WEIGHT_LOW`, so the sum
        is positive). A value outside its variable's range is clipped into it, as for
        every variable. Units no ratio rule matches get ratio 0. Keys other than the
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
            total = sum(weights.values())  # >= WEIGHT_LOW · n > 0: read() clips into the range
            mix = {c: weights[c] / total for c in self.criteria}
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
        cls = sampler_class(self.sampler.name)
        try:
            return build(self.sampler.name, kwargs, seed)
        except Exception as exc:  # noqa: BLE001 - re-raised naming the key
            raise SearchSpaceError(f"{self.label}: sampler: optuna's {cls.__name__} rejects "
                                   f"{show(kwargs)} ({type(exc).__name__}: {clip(str(exc), 100)})") from None

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


def load(path_or_name: "str | Path") -> SearchSpace:
    """Load and validate a search space: a YAML file, or a packaged name
    (``resnet_cifar``, ``vgg_cifar``, ``generic``; ``.yaml`` optional). A file that
    exists wins over a packaged name."""
    path, name, label = resolve(path_or_name)
    return SearchSpace.from_dict(read_yaml(path, label), name=name, path=path, label=label)
