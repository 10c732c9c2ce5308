"""SG-CNN as a width method: self-grouping convolution meeting the budget, no channel removed.

Every unit keeps all its channels; the budget is met by SG-CNN's own pipeline
(:mod:`autoprune.selfgroup`): per layer, importance vectors ``v_i[j] = Σ_hw |W[i, j]|``, k-means
of the filters into ``min(sg_k, out)`` groups, and the connection ratio ``cp`` (one for every
layer, each layer's threshold its own member-weighted percentile) solved by bisection on
the exact cost of the self-grouped model (:func:`~autoprune.selfgroup.fit_cp`): at most the
target, one connection more would exceed it. The layers grouped are
:func:`~autoprune.selfgroup.eligible_layers`: the dense convs but the RGB stem and small 1×1
projections, and the fully connected layers with at least 32 inputs (**Reconstruction**:
METHODS.md §6 describes convs only; a linear is grouped by the same rule, as a real
smaller matmul). The returned Plan keeps every channel and carries the grouping spec; the
pipeline then adapts BN and fine-tunes (SG-CNN's global fine-tuning) and measures the
realized cost on the grouped model itself.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import OptionError, short
from ..plan import Plan
from ..selfgroup import eligible_convs, eligible_layers, fit_cp
from .base import Context, WidthMethod, WidthResult

DEFAULT_K = 16
"""Filter groups per layer (the paper's default), capped at each layer's output channels."""


class SelfGroup(WidthMethod):
    name = "selfgroup"
    help = "SG-CNN self-grouping convolution: k-means filter groups, connections cut to the budget (--sg-k)"
    needs_calibration = False  # importance vectors are read from the weights

    def check(self, options: Mapping[str, Any]) -> None:
        k = options.get("sg_k", DEFAULT_K)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise OptionError(f"sg_k (filter groups per layer) must be a positive integer (default "
                              f"{DEFAULT_K}), got {short(k)}")

    def widths(self, space, budget, context: Context) -> WidthResult:
        options = context.options
        self.check(options)
        model = context.model
        if model is None:
            raise OptionError("method selfgroup groups the model's own layers: the context needs the model "
                              "(autoprune.prune passes it)")
        k = options.get("sg_k", DEFAULT_K)
        target = budget.target(space)
        base = getattr(space.cost(), budget.kind)
        layers = eligible_layers(model)
        device = next(model.parameters()).device
        fit = fit_cp(model, layers, budget.kind, target, base, torch.zeros(space.input_shape, device=device),
                     k=k, seed=context.seed)
        plan = Plan({}, {}, tuple(space.input_shape), selfgroup=fit.spec)
        convs = set(eligible_convs(model))
        info = {"k": k, "cp": fit.cp, "kind": budget.kind, "target": target, "realized": fit.cost,
                "convs": [n for n in layers if n in convs], "linears": [n for n in layers if n not in convs]}
        return WidthResult({u.name: u.width for u in space.units}, plan=plan,
                           info={"criterion": {"sg_importance": 1.0}, "compute": {"proxy_evaluations": 0},
                                 "selfgroup": info})
