"""Torch-Pruning's own global magnitude pruning at the budget; it picks the channels too
(:func:`autoprune.tp_baseline.tp_global_plan`), so no calibration is needed."""

from __future__ import annotations

from ..tp_baseline import tp_global_plan
from .base import Context, NO_EVALUATIONS, WidthMethod, WidthResult


class TPGlobal(WidthMethod):
    name = "tp_global"
    help = "Torch-Pruning's global magnitude pruning (its own channel choice)"
    needs_calibration = False

    def widths(self, space, budget, context: Context) -> WidthResult:
        plan = tp_global_plan(space, budget)
        return WidthResult(space.complete(plan.kept_widths()), plan=plan,
                           info={**NO_EVALUATIONS, "criterion": {"tp_magnitude": 1.0}, **plan.meta})
