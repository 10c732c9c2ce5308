"""Greedy (DI, Hou & Kung 2020): the authors' budget loop, one committed step at a time.

Wraps :func:`autoprune.greedy.greedy_widths` with the model and data in the context:
``greedy_mode="accuracy"`` (default, the authors') commits the candidate step with the
highest masked validation accuracy after adaptive BN on ``greedy_bn_batches`` training
batches; ``"criterion"`` (cheap) the least DI lost per FLOP saved (the score lost for
criteria other than pure ``di``). ``greedy_rescore=N`` re-ranks every unit's kept channels
by the run's criterion on the current masked network every N steps (1, default: every
step, as the authors); ``greedy_cap`` (0.9) stops proposing for a unit that much pruned;
``greedy_finetune_every=K`` fine-tunes the working copy for ``greedy_finetune_steps`` SGD
steps (lr 0.01, :func:`autoprune.evaluate.proxy_finetune`) every K steps, masks held.
``greedy_screen=K`` (default 4; 0: off, the authors') is the speed-up that makes accuracy
mode affordable on deep nets: every candidate is scored on one validation batch of 256
images and only the best K on all :data:`VAL_BATCHES` (a deviation: the authors score every
candidate on their whole validation set; ``benchmarks/greedy.py`` measures the time saved and
how often the screened step equals the unscreened one).

The greedy picks the channels itself (its final ranking: the returned Plan is exactly
what its last step evaluated). With fine-tuning, the authors keep the fine-tuned weights,
and so does this method: the WidthResult carries the working copy (``model``) and the
pipeline prunes that copy instead of the caller's model; the base accuracy and any
distillation teacher stay the caller's dense model.

A context without a model and data (the search's seed structures) can only run the
criterion mode without re-scoring or fine-tuning, so those are its defaults there; asking
for the others without a model and data is an error. ``info["greedy"]`` names the mode,
rule, step, cap, re-scoring period and fine-tune settings, the wall time (``wall_s``) and
counts; ``info["compute"]["proxy_evaluations"]`` counts the masked-accuracy evaluations.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Mapping

from .. import criteria, evaluate
from ..data import loader
from ..errors import OptionError, short
from ..greedy import DEFAULT_CAP, MODES, FineTune, greedy_widths
from ..greedy_masks import MaskedEvaluator
from ..greedy_rescore import Rescorer, di_scatter
from ..plan import select
from .base import Context, WidthMethod, WidthResult

VAL_BATCHES = 8
"""Validation batches of 256 images the greedy scores each step on (accuracy mode, trajectory)."""

DEFAULTS = {"greedy_mode": "accuracy", "greedy_step": 0.01, "greedy_bn_batches": 2, "greedy_recalibrate": 0,
            "greedy_rescore": 1, "greedy_cap": DEFAULT_CAP, "greedy_finetune_every": 0,
            "greedy_finetune_steps": 100, "greedy_screen": 4}
"""The options' defaults (:func:`autoprune.prune` and the CLI use the same)."""

WITHOUT_DATA = {"greedy_mode": "criterion", "greedy_rescore": 0}
"""The defaults that differ where the context has no model and data."""


REUSE_PREFIX = True
"""Whether candidate evaluations replay what their unit cannot change (:mod:`autoprune.greedy_prefix`).
Exact, so not an option of the method; ``benchmarks/greedy.py`` sets it False to measure the saving."""


def evaluator(model, space, data, seed: int, bn_batches: int) -> MaskedEvaluator:
    """Masked accuracy on the first validation batches, after adaptive BN on ``bn_batches``."""
    val = list(itertools.islice(loader(data.val, batch_size=256), VAL_BATCHES))
    train = list(itertools.islice(loader(data.train, batch_size=64, shuffle=True, seed=seed), bn_batches))
    return MaskedEvaluator(model, space, val, train, bn_fn=lambda m, b: evaluate.adaptive_bn(m, b),
                           reuse_prefix=REUSE_PREFIX)


def _count(options: Mapping[str, Any], key: str, least: int = 0) -> None:
    value = options.get(key, DEFAULTS[key])
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise OptionError(f"{key} must be an integer >= {least}, got {short(value)}")


def _fraction(options: Mapping[str, Any], key: str, what: str, closed: bool) -> None:
    value = options.get(key, DEFAULTS[key])
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value and \
        (value <= 1 if closed else value < 1)
    if not ok:
        raise OptionError(f"{key} must be a fraction in (0, 1{']' if closed else ')'} ({what}), got {short(value)}")


class Greedy(WidthMethod):
    name = "greedy"
    help = ("DI greedy as the authors run it: commit the step with the best masked accuracy, "
            "re-ranking by DI on the pruned network (or the cheap DI-lost-per-FLOP mode)")

    def check(self, options: Mapping[str, Any]) -> None:
        mode = options.get("greedy_mode", DEFAULTS["greedy_mode"])
        if mode not in MODES:
            raise OptionError(f"unknown greedy mode {short(mode)}; choose one of {', '.join(MODES)}")
        _fraction(options, "greedy_step", "of the base cost per step, e.g. 0.01", closed=False)
        _fraction(options, "greedy_cap", "a unit at least that much pruned proposes nothing; 0.9 = the "
                  "authors', 1 = no cap", closed=True)
        for key in ("greedy_bn_batches", "greedy_recalibrate", "greedy_rescore", "greedy_finetune_every",
                    "greedy_screen"):
            _count(options, key)
        _count(options, "greedy_finetune_steps", least=1)

    def widths(self, space, budget, context: Context) -> WidthResult:
        start = time.perf_counter()
        has_data = context.model is not None and context.data is not None
        o = {**DEFAULTS, **({} if has_data else WITHOUT_DATA), **context.options}
        self.check(o)
        if context.scores is None:
            raise OptionError("method greedy ranks channels by criterion scores; give the context scores")
        if not has_data:
            asked = [f"greedy_mode {o['greedy_mode']!r}"] if o["greedy_mode"] == "accuracy" else []
            asked += [k for k in ("greedy_rescore", "greedy_finetune_every") if o[k]]
            if asked:
                raise OptionError(f"{asked[0]} needs the model and data in the context; give them, or use "
                                  "greedy_mode 'criterion' with greedy_rescore 0 and greedy_finetune_every 0")
        weights = dict(context.criterion) if context.criterion is not None else None
        params = context.stats.settings.get("criteria", {}) if context.stats is not None else {}
        pure_di = weights is not None and [k for k, w in weights.items() if w > 0] == ["di"]
        di = di_scatter(context.stats, params.get("di")) if pure_di and context.stats is not None \
            and "di" in context.stats else None
        judge = evaluator(context.model, space, context.data, context.seed, o["greedy_bn_batches"]) \
            if has_data else None
        rescorer = self._rescorer(space, context, judge, weights, params) if o["greedy_rescore"] else None
        finetune = None
        if o["greedy_finetune_every"]:
            steps, data, seed, device = o["greedy_finetune_steps"], context.data, context.seed, context.device
            finetune = FineTune(o["greedy_finetune_every"], steps, lambda m, r: evaluate.proxy_finetune(
                m, data, steps=steps, seed=seed + 1 + r, device=device))
        result = greedy_widths(space, context.scores, budget, step=o["greedy_step"], mode=o["greedy_mode"],
                               evaluator=judge, recalibrate_every=o["greedy_recalibrate"],
                               progress=context.progress, clusters=context.clusters, cap=o["greedy_cap"],
                               di=di, rescorer=rescorer, rescore_every=o["greedy_rescore"], finetune=finetune,
                               screen=o["greedy_screen"])
        plan = select(space, result.widths, scores=result.scores, clusters=context.clusters)
        info = {**result.info, "bn_batches": o["greedy_bn_batches"] if has_data else 0,
                "val_batches": VAL_BATCHES if has_data else 0,
                "prefix_reuse": dict(judge.prefix) if judge is not None else None,
                "wall_s": round(time.perf_counter() - start, 3)}
        return WidthResult(result.widths, result.trajectory, plan=plan,
                           info={"greedy": info, "compute": {"proxy_evaluations": result.info["proxy_evaluations"]}},
                           model=judge.model if judge is not None and judge.finetuned else None)

    @staticmethod
    def _rescorer(space, context: Context, judge: MaskedEvaluator, weights, params) -> Rescorer:
        """Re-scoring by the run's criterion, on the working copy, with the images the pipeline
        calibrated on (``context.calibration``, as many as the stats saw)."""
        if weights is None:
            raise OptionError("greedy_rescore re-ranks by the run's criterion: give the context its "
                              "criterion weights (Context(criterion=...)), or set greedy_rescore 0")
        n_images = int(context.stats.settings.get("n_images", 0)) if context.stats is not None else 0
        if any(criteria.get(name).taps() for name in weights) and (context.calibration is None or n_images < 1):
            raise OptionError("greedy_rescore recalibrates on the run's calibration images: give the context "
                              "the calibration batches and stats, or set greedy_rescore 0")
        return Rescorer(space, judge.model, context.calibration, weights, params, n_images, seed=context.seed,
                        device=context.device)
