"""Torch-Pruning's own global magnitude pruning, at the same budget, as a Plan.

The peer most users try first: ``tp.pruner.MetaPruner`` with
``GroupMagnitudeImportance`` and ``global_pruning=True`` (one threshold across all
layers on group-normalised magnitudes), run through Torch-Pruning's API. Its
``pruning_ratio`` counts channels, not FLOPs, so the ratio is found by bisection
on autoprune's exact cost of the channels it would remove; the removed indices
are read from the groups it yields, so the returned Plan reproduces exactly the
model Torch-Pruning builds.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch_pruning as tp

from .budget import Budget
from .errors import BudgetError
from .plan import Plan
from .space import Space


def _pruner(model: torch.nn.Module, space: Space, ratio: float, p: int) -> tp.pruner.MetaPruner:
    """Torch-Pruning's global magnitude pruner on ``model``, ignoring the classifier."""
    ignored = [model.get_submodule(n) for n in space.ignored]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tp.pruner.MetaPruner(
            model, space.example_input, importance=tp.importance.GroupMagnitudeImportance(p=p),
            global_pruning=True, pruning_ratio=ratio, ignored_layers=ignored)


def _removed(space: Space, ratio: float, p: int) -> dict[str, list[int]]:
    """Channels Torch-Pruning's global magnitude pruner removes at ``ratio``, per unit."""
    model = space.model.eval()
    pruner = _pruner(model, space, ratio, p)
    name_of = {m: n for n, m in model.named_modules()}
    removed: dict[str, list[int]] = {}
    roots = {n for u in space.units for n in u.modules}
    unit_of = {n: u.name for u in space.units for n in u.modules}
    for group in pruner.step(interactive=True):  # inspect only: the model is not pruned
        for item in group.items:
            name = name_of.get(item.dep.target.module)
            if name in roots and pruner.DG.is_out_channel_pruning_fn(item.dep.handler):
                removed[unit_of[name]] = sorted(int(i) for i in item.idxs)
                break
    return removed


def _widths(space: Space, removed: dict[str, list[int]]) -> dict[str, int]:
    return {u.name: u.width - len(removed.get(u.name, [])) for u in space.units}


def tp_global_plan(space: Space, budget: "str | Budget", p: int = 2, iters: int = 12) -> Plan:
    """The Plan of Torch-Pruning's global magnitude pruning whose cost meets ``budget``.

    Bisection on the channel ratio keeps the largest structure at or under the
    target; Torch-Pruning's own channel choice is kept unchanged (no topping up).
    """
    budget = Budget.parse(budget)
    target = budget.target(space)
    lo, hi = 0.0, 0.95
    best = _removed(space, hi, p)
    if getattr(space.cost(_widths(space, best)), budget.kind) > target:
        raise BudgetError(f"budget {budget} cannot be met by Torch-Pruning's global pruning even at channel "
                          f"ratio {hi}; use a looser budget or another method")
    for _ in range(iters):
        mid = (lo + hi) / 2
        removed = _removed(space, mid, p)
        if getattr(space.cost(_widths(space, removed)), budget.kind) <= target:
            hi, best = mid, removed
        else:
            lo = mid
    keep = {u.name: sorted(set(range(u.width)) - set(best[u.name])) for u in space.units if best.get(u.name)}
    plan = Plan(keep, {n: space.unit(n).width for n in keep}, space.input_shape)
    plan.meta = {"method": "tp_global", "pruning_ratio": hi, "importance": f"GroupMagnitudeImportance(p={p})"}
    return plan


def tp_pruned_model(space: Space, ratio: float, p: int = 2) -> torch.nn.Module:
    """Torch-Pruning's own pruned copy at channel ratio ``ratio`` (for cross-checks)."""
    model = copy.deepcopy(space.model).eval()
    _pruner(model, space, ratio, p).step()
    return model
