"""WSP: remove the weak sub-network in one shot, at the smallest percentile that meets the
budget (:func:`autoprune.wsp.wsp_plan`). The method chooses the channels itself (every weak
channel goes, every other stays but where a unit's granularity rounds its width up), so the
pipeline applies its Plan as it is rather than re-selecting channels by a criterion. Nothing
is topped up: the cost lands at or under the target, as close as whole weak sets allow
(units of equal width cross a percentile step together, so possibly more than the 0.5%
tolerance under it; the report's ``within_tolerance`` then says so).

``wsp_variant="weight"`` (default, the authors' code) reads weight norms and needs no
calibration; ``"data"`` reads mean |activation| and |gradient|, so the pipeline calibrates
``wsp_data`` for it (:meth:`WSP.calibrates`).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..criteria.wsp import VARIANTS
from ..errors import OptionError, short
from ..wsp import wsp_plan
from .base import Context, NO_EVALUATIONS, WidthMethod, WidthResult

CRITERION = {"weight": "wsp", "data": "wsp_data"}
"""The criterion whose saliencies each variant reads (recorded as the run's criterion)."""


class WSP(WidthMethod):
    name = "wsp"
    help = "weak sub-network pruning in one shot (its own channels; --wsp-variant weight or data)"
    needs_calibration = False  # its Plan picks the channels; the data variant asks for wsp_data
    default_criterion = "wsp"

    def check(self, options: Mapping[str, Any]) -> None:
        variant = options.get("wsp_variant", "weight")
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise OptionError(f"unknown wsp_variant {short(variant)}; choose one of {', '.join(VARIANTS)}")

    def calibrates(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        return ("wsp_data",) if options.get("wsp_variant", "weight") == "data" else ()

    def widths(self, space, budget, context: Context) -> WidthResult:
        variant = context.options.get("wsp_variant", "weight")
        self.check({"wsp_variant": variant})
        if variant == "data" and context.stats is None:
            raise OptionError("wsp_variant 'data' reads activations and gradients: the context needs "
                              "calibration stats of criterion wsp_data (autoprune.prune calibrates them)")
        plan = wsp_plan(space, context.stats, budget=budget, variant=variant)
        return WidthResult(space.complete(plan.kept_widths()), plan=plan,
                           info={**NO_EVALUATIONS, "criterion": {CRITERION[variant]: 1.0},
                                 "wsp": {"variant": variant, "p": plan.meta["p"]}})
