"""WSP: remove the weak sub-network at the smallest percentile that fits, then top up to
the budget (:func:`autoprune.wsp.wsp_widths`, :func:`autoprune.budget.fill_widths`)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..budget import fill_widths
from ..criteria.wsp import VARIANTS
from ..errors import OptionError, short
from ..wsp import wsp_widths
from .base import Context, WidthMethod, WidthResult


class WSP(WidthMethod):
    name = "wsp"
    help = "weak sub-network pruning in one shot, topped up to the budget"
    default_criterion = "wsp"

    def check(self, options: Mapping[str, Any]) -> None:
        variant = options.get("wsp_variant", "weight")
        if variant not in VARIANTS:
            raise OptionError(f"unknown wsp_variant {short(variant)}; choose one of {', '.join(VARIANTS)}")

    def widths(self, space, budget, context: Context) -> WidthResult:
        variant = context.options.get("wsp_variant", "weight")
        self.check({"wsp_variant": variant})
        widths = wsp_widths(space, context.stats, budget=budget, variant=variant)
        wanted = np.array([widths[u.name] for u in space.units], dtype=float)
        return WidthResult(fill_widths(space, widths, wanted, budget.kind, budget.target(space)))
