"""WSP allocation: remove the weak sub-network in one shot (Neural Networks 144:614, 2021).

Channel k of a unit is weak iff its feed-forward saliency ``f_k`` and feed-backward
saliency ``b_k`` are both below the p-th percentile of the unit's values (see
:mod:`autoprune.criteria.wsp`). All weak channels of every unit — fully connected
units included — are removed at once; each unit's kept count is then rounded *up*
to a width the unit allows (a multiple of ``unit.step``, at least ``min_width``).
With a budget, ``p`` is chosen by bisection: the weak set only grows with ``p``, so
the smallest ``p`` whose structure meets the budget gives the largest such structure.

>>> widths = wsp_widths(space, None, 50)                       # weight proxies, p = 50
>>> widths = wsp_widths(space, None, budget="flops<=50%")      # p found by bisection
>>> plan = wsp_plan(space, None, budget="flops<=50%")          # exactly the non-weak channels
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .budget import Budget, human
from .criteria.wsp import min_rank_score, saliency, weak_channels
from .errors import BudgetError, OptionError, short
from .plan import Plan, select

BISECTION_STEPS = 50


def _kept(unit, n_weak: int) -> int:
    """The allowed width nearest above ``width - n_weak``."""
    kept = unit.width - n_weak
    if kept >= unit.width:
        return unit.width
    kept = max(unit.min_width, math.ceil(kept / unit.step) * unit.step)
    return min(kept, unit.width)


def _widths(space, sal, p: float) -> dict[str, int]:
    weak = weak_channels(sal, p)
    return {u.name: _kept(u, int(weak[u.name].sum())) for u in space.units}


def wsp_percentile(space, stats=None, budget: "str | Budget" = "flops<=50%",
                   variant: str = "weight") -> float:
    """The smallest percentile ``p`` whose weak-set removal meets ``budget``.

    BudgetError if even ``p = 100`` (every channel weak except those at the top of
    ``f`` or ``b``) leaves more than the budget allows.
    """
    return _search(space, saliency(space, stats, variant), Budget.parse(budget))


def _search(space, sal, budget: Budget) -> float:
    target = budget.target(space)

    def cost(p: float) -> int:
        return getattr(space.cost(_widths(space, sal, p)), budget.kind)

    if cost(0.0) <= target:
        return 0.0
    top = cost(100.0)
    if top > target:
        base = getattr(space.cost(), budget.kind)
        raise BudgetError(
            f"budget {budget} cannot be met by WSP: even with p=100 (every channel weak except "
            f"each unit's strongest by f or b) {budget.kind} is {human(top)} ({top / base:.1%} of "
            f"{human(base)}) > target {human(target)}; use a looser budget or another method")
    lo, hi = 0.0, 100.0  # cost(lo) > target >= cost(hi)
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cost(mid) <= target else (mid, hi)
    return hi


def _resolve(space, stats, p, budget, variant):
    """The percentile to use and the saliencies ``(f, b)`` per unit."""
    sal = saliency(space, stats, variant)
    if budget is not None:
        if p is not None:
            raise OptionError(f"wsp: give a percentile p or a budget (which chooses p), not both (got p={short(p)})")
        return _search(space, sal, Budget.parse(budget)), sal
    if p is None:
        raise OptionError("wsp: give a percentile p (0..100) or a budget (e.g. budget=\"flops<=50%\")")
    return float(p), sal


def wsp_widths(space, stats=None, p: float | None = None, budget: "str | Budget | None" = None,
               variant: str = "weight") -> dict[str, int]:
    """Per unit, the channels kept after removing WSP's weak channels at percentile ``p``.

    ``stats`` is needed only for ``variant="data"`` (calibrate with ``wsp_data``).
    With ``budget`` (``"flops<=50%"`` or a :class:`~autoprune.Budget`), ``p`` is found
    by bisection so the cost is at most the target and as close to it as WSP allows;
    BudgetError if even ``p = 100`` cannot meet it.
    """
    p, sal = _resolve(space, stats, p, budget, variant)
    return _widths(space, sal, p)


def _scores(sal, p: float) -> dict[str, torch.Tensor]:
    weak = weak_channels(sal, p)
    return {u: min_rank_score(f, b) + torch.from_numpy(~weak[u]).float() * 2
            for u, (f, b) in sal.items()}


def wsp_scores(space, stats=None, p: float = 50.0, variant: str = "weight") -> dict[str, torch.Tensor]:
    """Selection scores ranking every weak channel below every non-weak one.

    Within each class the WSP min-rank score orders channels, so when a unit's width
    is rounded up the strongest weak channels are the ones kept back.
    """
    return _scores(saliency(space, stats, variant), p)


def wsp_plan(space, stats=None, p: float | None = None, budget: "str | Budget | None" = None,
             variant: str = "weight") -> Plan:
    """The Plan keeping exactly each unit's non-weak channels (plus, where the unit's
    granularity rounds its width up, its strongest weak channels; grouped units keep
    the same local channels in every group, chosen by mean score).

    ``plan.meta`` records ``method``, ``p`` and ``variant`` (and ``budget`` if given).
    """
    p, sal = _resolve(space, stats, p, budget, variant)
    plan = select(space, _widths(space, sal, p), _scores(sal, p))
    plan.meta.update({"method": "wsp", "p": p, "variant": variant})
    if budget is not None:
        plan.meta["budget"] = str(Budget.parse(budget))
    return plan


def weak_sets(space, stats=None, p: float = 50.0, variant: str = "weight") -> dict[str, np.ndarray]:
    """Per unit, the indices of WSP's weak channels at percentile ``p``."""
    return {u: np.flatnonzero(m) for u, m in weak_channels(saliency(space, stats, variant), p).items()}


__all__ = ["weak_sets", "wsp_percentile", "wsp_plan", "wsp_scores", "wsp_widths"]
