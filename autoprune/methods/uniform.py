"""Uniform: every unit pruned by the same ratio, scaled to meet the budget."""

from __future__ import annotations

from .base import Context, NO_EVALUATIONS, WidthMethod, WidthResult


class Uniform(WidthMethod):
    name = "uniform"
    help = "the same share of every unit, scaled to the budget"

    def widths(self, space, budget, context: Context) -> WidthResult:
        return WidthResult(space.fit({u.name: 0.5 for u in space.units}, budget), info=NO_EVALUATIONS)
