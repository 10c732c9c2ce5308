"""Greedy (DI, Hou & Kung 2020): remove the cheapest step at a time until the budget is met.

Wraps :func:`autoprune.greedy.greedy_widths`. With the model and data in the context,
each committed step's validation accuracy is recorded (after adaptive BN on
``greedy_bn_batches`` training batches), and ``greedy_mode="accuracy"`` ranks the
candidate steps by it (the authors' way) instead of the score lost per FLOP saved
(``"criterion"``, the default: see :mod:`autoprune.greedy`). With ``context.clusters`` the
candidates keep channels per cluster exactly as the final Plan will. The result's
``info["greedy"]`` and every trajectory entry name the mode.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

from .. import evaluate
from ..data import loader
from ..errors import OptionError, short
from ..greedy import MODES, MaskedEvaluator, greedy_widths
from .base import Context, WidthMethod, WidthResult

VAL_BATCHES = 8
"""Validation batches of 256 images the greedy scores each step on (accuracy mode, trajectory)."""

DEFAULTS = {"greedy_mode": "criterion", "greedy_step": 0.005, "greedy_bn_batches": 5, "greedy_recalibrate": 0}


def evaluator(model, space, data, seed: int, bn_batches: int) -> MaskedEvaluator:
    """Masked accuracy on the first validation batches, after adaptive BN on ``bn_batches``."""
    val = list(itertools.islice(loader(data.val, batch_size=256), VAL_BATCHES))
    train = list(itertools.islice(loader(data.train, batch_size=64, shuffle=True, seed=seed), bn_batches))
    return MaskedEvaluator(model, space, val, train, bn_fn=lambda m, b: evaluate.adaptive_bn(m, b))


def _count(options: Mapping[str, Any], key: str) -> None:
    value = options.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(f"{key} must be an integer >= 0, got {short(value)}")


class Greedy(WidthMethod):
    name = "greedy"
    help = "DI greedy: remove the cheapest channels step by step (criterion or accuracy mode)"

    def check(self, options: Mapping[str, Any]) -> None:
        mode = options.get("greedy_mode", DEFAULTS["greedy_mode"])
        if mode not in MODES:
            raise OptionError(f"unknown greedy mode {short(mode)}; choose one of {', '.join(MODES)}")
        step = options.get("greedy_step", DEFAULTS["greedy_step"])
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0 < step < 1:
            raise OptionError(f"greedy_step must be a fraction of the base cost in (0, 1) "
                                 f"(e.g. 0.005), got {short(step)}")
        _count(options, "greedy_bn_batches")
        _count(options, "greedy_recalibrate")

    def widths(self, space, budget, context: Context) -> WidthResult:
        o = {**DEFAULTS, **context.options}
        self.check(o)
        if context.scores is None:
            raise OptionError("method greedy ranks channels by criterion scores; give the context scores")
        judge = None
        if context.model is not None and context.data is not None:
            judge = evaluator(context.model, space, context.data, context.seed, o["greedy_bn_batches"])
        elif o["greedy_mode"] == "accuracy":
            raise OptionError("greedy_mode 'accuracy' scores steps on validation data; give the "
                                 "context a model and data (or use greedy_mode 'criterion')")
        result = greedy_widths(space, context.scores, budget, step=o["greedy_step"], mode=o["greedy_mode"],
                               evaluator=judge, recalibrate_every=o["greedy_recalibrate"],
                               progress=context.progress, clusters=context.clusters)
        return WidthResult(result.widths, result.trajectory, info={"greedy": result.info})
