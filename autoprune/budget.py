"""Budgets (what remains of FLOPs or params) and fitting a structure's shape to one.

``Budget.parse("flops<=50%")`` keeps at most half the baseline FLOPs;
``"params<=1.2M"`` and ``"flops<=62M"`` are absolute. :func:`fit_widths` scales a
vector of per-unit prune ratios by one factor (bisection on the analytic cost),
then adds channels back one step at a time, so every structure is at most the
target and, where unit granularity allows, within 0.5% below it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .errors import BudgetError, short

KINDS = ("flops", "params")
SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}
TOLERANCE = 0.005
MAX_ABSOLUTE = 1e15
"""The largest absolute budget accepted (10^15 FLOPs or params: far above any CNN's)."""
_PATTERN = re.compile(r"^\s*(flops|params)\s*<=\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                      r"|[-+]?(?:inf|infinity|nan))\s*(%|[kKmMgG])?\s*$", re.IGNORECASE)
_FORMAT = ("write KIND<=VALUE with KIND flops or params and VALUE like 50%, 0.5, 62M or 1.2M")


@dataclass(frozen=True)
class Budget:
    """At most ``value`` FLOPs or params remain: a fraction of the base if ``relative``.

    ``str(budget)`` parses back to an equal Budget (exactly: ``"flops<=50%"`` stays
    ``"flops<=50%"``, ``"params<=1234567"`` stays ``"params<=1234567"``).
    """

    kind: str
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: "str | Budget") -> "Budget":
        """Parse ``flops<=50%``, ``flops<=0.5``, ``flops<=62M`` or ``params<=1.2M``."""
        if isinstance(text, Budget):
            return text
        text = str(text)
        m = _PATTERN.match(text) if len(text) <= 400 else None
        if not m:
            raise BudgetError(f"budget {short(text)} is malformed; {_FORMAT}")
        kind, number, suffix = m.group(1).lower(), float(m.group(2)), (m.group(3) or "")
        if not math.isfinite(number):
            raise BudgetError(f"budget {short(text)}: VALUE must be a finite number; {_FORMAT}")
        if number <= 0:
            raise BudgetError(f"budget {short(text)}: VALUE must be positive; {_FORMAT}")
        if suffix == "%" or (not suffix and number <= 1):
            fraction = number / 100 if suffix == "%" else number
            if not 0 < fraction <= 1:
                raise BudgetError(f"budget {short(text)}: a relative budget must be in (0%, 100%] "
                                  "(a plain VALUE above 1 is an absolute count)")
            return cls(kind, fraction, True)
        value = number * SUFFIX[suffix.lower()]
        if value <= 1:
            raise BudgetError(f"budget {short(text)}: an absolute budget must be more than 1 "
                              "(like 62M or 1.2G); for a fraction write 50% or 0.5")
        if value > MAX_ABSOLUTE:
            raise BudgetError(f"budget {short(text)}: an absolute budget must be at most "
                              f"{MAX_ABSOLUTE:.0e} (like 62M or 1.2G); for a fraction write 50% or 0.5")
        return cls(kind, value, False)

    def __str__(self) -> str:
        """The shortest spelling that parses back to exactly this budget."""
        for text in _spellings(self):
            try:
                if Budget.parse(text) == self:
                    return text
            except BudgetError:
                pass
        return f"{self.kind}<={self.value!r}"  # a fraction (<= 1) or a count (> 1): exact either way

    def target(self, space) -> int:
        """The absolute target for ``space``; BudgetError if outside what it can reach."""
        base = getattr(space.cost(), self.kind)
        target = int(np.floor(self.value * base)) if self.relative else int(self.value)
        smallest = getattr(space.cost(space.min_widths()), self.kind)
        if target < smallest:
            raise BudgetError(
                f"budget {self} is below the smallest reachable structure: {self.kind} "
                f"{human(smallest)} ({smallest / base:.1%} of {human(base)}); use at least "
                f"{self.kind}<={100 * smallest / base:.2f}%")
        if target > base:
            raise BudgetError(f"budget {self} exceeds the unpruned model's {self.kind} "
                              f"{human(base)}: nothing to prune")
        return target

    def describe(self, space, widths: Mapping[str, int]) -> dict:
        """Target, base and realized cost of ``widths``, for reports: the budget as its
        ``spec`` string and exactly (``value``, ``relative``), the counts as integers."""
        base = getattr(space.cost(), self.kind)
        target = self.target(space)
        realized = getattr(space.cost(widths), self.kind)
        return {"kind": self.kind, "spec": str(self), "value": self.value, "relative": self.relative,
                "base": base, "target": target,
                "realized": realized, "realized_ratio": realized / base,
                "within_tolerance": target * (1 - TOLERANCE) <= realized <= target}


def _spellings(budget: Budget):
    """Candidate spellings of ``budget``, shortest first: 50%, then 62M / 1234567, then repr."""
    kind, v = budget.kind, float(budget.value)
    if not math.isfinite(v):
        return
    if budget.relative:
        for digits in range(0, 20):
            yield f"{kind}<={_fixed(v * 100, digits)}%"
        yield f"{kind}<={v!r}"
        return
    for suffix in ("G", "M", "K"):
        scaled = v / SUFFIX[suffix.lower()]
        if scaled >= 1:
            for digits in range(0, 3):  # 62M, 1.2M, 2.25G; else the plain count (1234567)
                yield f"{kind}<={_fixed(scaled, digits)}{suffix}"
    if v.is_integer():
        yield f"{kind}<={int(v)}"
    yield f"{kind}<={v!r}"


def _fixed(x: float, digits: int) -> str:
    """``x`` with at most ``digits`` decimals, no exponent, no trailing zeros."""
    text = f"{x:.{digits}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def human(n: float) -> str:
    """``n`` with three significant digits and a K/M/G suffix (62.5M), for messages."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(int(n))


class _Path:
    """Widths along a one-parameter path from the full model to the smallest one.

    For t in [0, 1] each unit prunes ``min(max_ratio, t·a·ratio)`` (the shape,
    scaled until its most pruned units saturate); for t in [1, 2] every unit blends
    linearly towards its minimum width, so the path always reaches the budget.
    """

    def __init__(self, space, ratios: np.ndarray, max_ratio: float) -> None:
        self.units = space.units
        self.width = np.array([u.width for u in space.units], dtype=float)
        self.minw = np.array([u.min_width for u in space.units], dtype=float)
        self.ratios = ratios
        self.max_ratio = max_ratio
        positive = ratios[ratios > 0]
        self.scale = max_ratio / positive.min() if positive.size else 0.0

    def continuous(self, t: float) -> np.ndarray:
        prune = np.minimum(self.max_ratio, min(t, 1.0) * self.scale * self.ratios)
        kept = self.width * (1 - prune)
        beta = max(0.0, t - 1.0)
        return np.maximum(self.minw, (1 - beta) * kept + beta * self.minw)

    def widths(self, t: float) -> dict[str, int]:
        return {u.name: u.round(k) for u, k in zip(self.units, self.continuous(t))}


def _ratio_vector(space, ratios: Mapping[str, float], max_ratio: float) -> np.ndarray:
    if not 0 < max_ratio < 1:
        raise BudgetError(f"max_ratio must be in (0, 1), got {short(max_ratio)}")
    for name, r in ratios.items():
        space.unit(name)
        if not 0 <= r < 1 or not np.isfinite(r):
            raise BudgetError(f"ratio of unit {name} must be a fraction to prune in [0, 1), got {short(r)}")
    return np.array([min(float(ratios.get(u.name, 0.0)), max_ratio) for u in space.units])


def fit_widths(space, ratios: Mapping[str, float], budget: "str | Budget",
               max_ratio: float = 0.9) -> dict[str, int]:
    """Integer widths shaped like ``ratios`` whose cost is at most the budget's target."""
    budget = Budget.parse(budget)
    target = budget.target(space)
    path = _Path(space, _ratio_vector(space, ratios, max_ratio), max_ratio)

    def cost(t: float) -> int:
        return getattr(space.cost(path.widths(t)), budget.kind)

    lo, hi = 0.0, 2.0
    if cost(lo) <= target:
        return path.widths(lo)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= target else (mid, hi)
    return fill_widths(space, path.widths(hi), path.continuous(lo), budget.kind, target)


def fill_widths(space, widths: Mapping[str, int], wanted: np.ndarray, kind: str, target: int) -> dict[str, int]:
    """``widths`` with channel steps added back while ``target`` allows, the unit furthest
    below its ``wanted`` width (per unit, in unit order) first, then the cheapest.

    Uses the quadratic form directly: raising ``z_i`` by ``d`` changes the cost by
    ``d·(Qs z)_i + d²·Q_ii`` with ``Qs = Q + Qᵀ``, so each step costs O(units).
    """
    model = space.cost_model
    q = model.q_flops if kind == "flops" else model.q_params
    qs = q + q.T
    z = model.z(widths)
    grad = qs @ z
    cost = float(z @ q @ z)
    kept = np.array([widths[u.name] for u in space.units])
    steps = np.array([u.step for u in space.units])
    full = np.array([u.width for u in space.units])
    while True:
        add = np.where(kept + steps <= full, steps, full - kept)
        d = add / full
        delta = d * grad[1:] + d * d * np.diag(q)[1:]
        fits = (add > 0) & (cost + delta <= target + 1e-6)
        if not fits.any():
            break
        deficit = np.where(fits, (wanted - kept) / full, -np.inf)
        i = int(np.argmax(deficit))
        if deficit[i] <= 0:
            i = int(np.argmax(np.where(fits, -delta, -np.inf)))
        kept[i] += add[i]
        cost += delta[i]
        grad += d[i] * qs[:, i + 1]
    return {u.name: int(k) for u, k in zip(space.units, kept)}
