"""NVIDIA ModelOpt's FastNAS as a peer arm: FastNAS chooses the structure, the pipeline does the rest.

FastNAS (:mod:`autoprune.peers.fastnas`) prunes a copy of the model at the budget, scoring
candidates by accuracy on the validation split (as the search's proxy) after re-estimating
their BN statistics on ``fastnas_batches`` training batches (at least 50: ModelOpt keeps its last
50 for each candidate, so more only calibrate the dense model longer); width choices are
rounded to ``fastnas_divisor`` channels (default 8; ModelOpt's 32 is too coarse for 16- to
64-channel CIFAR nets). The channels it kept are read back from its network as a Plan
(:func:`autoprune.peers.recover.recover_plan`), checked to reproduce its outputs, and the pipeline
fine-tunes that Plan from the same baseline with the same recipe as every other arm.

The budget is handed to FastNAS as the same fraction of its own count of the dense model
(torchprofile: 2 x multiply-adds, elementwise ops counted differently from fvcore), which it
treats as an upper bound. Its landing is recounted with autoprune's cost model; if that
overshoots the target FastNAS is re-run from its checkpoint (its sensitivity map kept, so only
the cheap threshold search repeats) with an absolute limit in its own count below its last
landing (:func:`next_limit`; a limit below its smallest subnet is raised halfway back towards
the last landing), at most :data:`ATTEMPTS` runs. (Tightening the percentage by the overshoot
alone was not enough on Fashion-MNIST ResNet-20: the two counts differ by an offset, not a
factor, and 4 runs all landed at 50.07% for 3 of 5 seeds.) ``info["fastnas"]`` records
where it landed (``realized``: autoprune's count and ModelOpt's own), the limits tried, its wall
time (``wall_s``) and settings;
``info["compute"]["proxy_evaluations"]`` counts its score_func calls. Needs the ``peers`` extra:
:meth:`FastNAS.available` says why not.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from ..errors import AutopruneError, BudgetError, OptionError, short
from ..peers.fastnas import MIN_BATCHES, Batches, missing, percent, run
from ..peers.recover import check_reproduces, recover_plan
from .base import Context, WidthMethod, WidthResult

DEFAULTS = {"fastnas_batches": MIN_BATCHES, "fastnas_divisor": 8}
"""The options' defaults (BN-calibration batches per candidate; width granularity in channels)."""

LEAST = {"fastnas_batches": MIN_BATCHES, "fastnas_divisor": 1}

ATTEMPTS = 6
"""FastNAS runs at most: the first at the budget's fraction, each later one at :func:`next_limit`."""


def next_limit(tried: list[dict], target: float) -> float:
    """ModelOpt's limit (an absolute number in its own count) for the run after ``tried``, whose
    every landing overshot ``target`` by autoprune's count: autoprune's count fitted as a line in
    ModelOpt's through the last two landings (secant; the counts differ by an offset as well as a
    factor), or scaled by the last overshoot where there is one landing or the line does not rise.
    Always below the last landing in ModelOpt's count, so the same subnet cannot be chosen again."""
    last = tried[-1]
    if len(tried) > 1 and last["modelopt"] != tried[-2]["modelopt"]:
        before = tried[-2]
        slope = (last["realized"] - before["realized"]) / (last["modelopt"] - before["modelopt"])
        secant = last["modelopt"] + (target - last["realized"]) / slope if slope > 0 else 0.0
        if secant > 0:
            return secant
    return last["modelopt"] * target / last["realized"]


class FastNAS(WidthMethod):
    name = "fastnas"
    help = 'NVIDIA ModelOpt FastNAS chooses the structure (peer arm; needs pip install -e ".[peers]")'
    needs_calibration = False  # FastNAS picks the channels; the Plan is read back from its network

    @classmethod
    def available(cls) -> str | None:
        return missing()

    def check(self, options: Mapping[str, Any]) -> None:
        for key, least in LEAST.items():
            value = options.get(key, DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                why = " (ModelOpt re-estimates every candidate's BN statistics on 50 batches)" \
                    if key == "fastnas_batches" else ""
                raise OptionError(f"{key} must be an integer >= {least}{why}, got {short(value)}")

    def widths(self, space, budget, context: Context) -> WidthResult:
        options = {key: context.options.get(key, default) for key, default in DEFAULTS.items()}
        self.check(options)
        if context.model is None or context.data is None:
            raise OptionError("method fastnas scores candidates by validation accuracy: the context needs "
                              "the model and data")
        target = budget.target(space)
        base = getattr(space.cost(), budget.kind)
        limit, tried, landings, calls = percent(target / base), [], [], 0
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="autoprune-fastnas-") as folder:
            checkpoint = os.path.join(folder, "fastnas_search.pth")
            for _ in range(ATTEMPTS):
                try:
                    result = run(copy.deepcopy(context.model), context.data, budget.kind, limit,
                                 batches=options["fastnas_batches"], divisor=options["fastnas_divisor"],
                                 checkpoint=checkpoint, seed=context.seed, progress=context.progress)
                except BudgetError:
                    if not landings:  # the budget itself is below its smallest subnet: unreachable
                        raise
                    # our own tightened limit fell below its smallest subnet: halfway back up
                    # towards its last landing (still below it)
                    tried.append({"limit": limit, "realized": None, "modelopt": None, "unsatisfiable": True})
                    limit = (limit + landings[-1]["modelopt"]) / 2
                    continue
                calls += result.score_calls
                plan = recover_plan(space, context.model, result.model, "FastNAS")
                widths = space.complete(plan.kept_widths())
                realized = getattr(space.cost(widths), budget.kind)
                landings.append({"limit": limit, "realized": realized,
                                 "modelopt": result.constraints.get(budget.kind)})
                tried.append(landings[-1])
                if realized <= target:
                    break
                if landings[-1]["modelopt"] is None:  # not a budget finding: ModelOpt's state lacks its count
                    raise AutopruneError(f"FastNAS overshot budget {budget} by autoprune's count and did not "
                                         f"report its own count of {budget.kind}, so its limit cannot be tightened")
                limit = next_limit(landings, target)
            else:
                raise BudgetError(f"FastNAS overshot budget {budget} by autoprune's count in {ATTEMPTS} runs "
                                  f"(last {realized / base:.2%} of the base {budget.kind})")
        wall = time.perf_counter() - start
        device = next(context.model.parameters()).device
        images = next(iter(Batches(context.data.train, 1, context.seed)))[0].to(device)
        check_reproduces(plan, context.model, result.model, images, "FastNAS")
        notes = {"realized": {"kind": budget.kind, "target": target, "autoprune": realized,
                              "ratio": realized / base, "modelopt": result.constraints},
                 "attempts": tried, "wall_s": round(wall, 2), "score_calls": calls,
                 "fastnas_batches": options["fastnas_batches"], "channel_divisor": options["fastnas_divisor"],
                 "modelopt_version": importlib.metadata.version("nvidia-modelopt")}
        return WidthResult(widths, plan=plan, info={"criterion": {"fastnas": 1.0}, "fastnas": notes,
                                                    "compute": {"proxy_evaluations": calls}})
