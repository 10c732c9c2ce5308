"""The steps every width method shares, written once: check, calibrate, score, finish, write.

``check_options`` validates every option before any work (AutopruneError naming the
parameter, the value and the choices); ``calibration_specs`` says what one calibration
pass must collect for the criteria and the clusters (HPSE's ``k`` included);
``criterion_scores``/``mixed_scores`` turn the summaries into per-unit scores (one
criterion: its scores; several: :func:`autoprune.criteria.mix`); ``finish`` adapts BN,
fine-tunes and measures base vs pruned; ``write_outputs`` writes the run's files as one set.
:func:`autoprune.prune` and the search runner are these steps plus a width method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import criteria as criteria_registry
from . import evaluate, grouping, methods
from .budget import Budget
from .criteria.base import Stats
from .data import DataBundle
from .errors import CriterionError, OptionError, short
from .greedy import MODES as GREEDY_MODES
from .plan import Plan
from .space import Space

__all__ = ["DI_MIN_CALIB_IMAGES", "LABEL_CRITERIA", "Result", "calibration_specs", "check_fits",
           "check_options", "criterion_params", "criterion_scores", "finish", "measure", "mixed_scores",
           "write_outputs"]


@dataclass
class Result:
    """The pruned model, its Plan and the report (the same dict as report.json)."""

    model: nn.Module
    plan: Plan
    report: dict


DI_MIN_CALIB_IMAGES = 2
"""DI compares classes (between-class scatter), so it needs calibration images of at least
two classes: fewer than 2 images is refused up front; 2 or more that happen to hold one
class only fail after calibration (CriterionError naming --calib-images)."""

LABEL_CRITERIA = ("di", "di_fullmap")
"""Criteria that compare classes (they read the labels of the calibration images)."""


# --------------------------------------------------------------------------- options


def check_options(method: str, criterion: "str | Mapping[str, float] | None" = None,
                  clusters: str | None = None, greedy_mode: str = "criterion",
                  calib_images: int = 512, cluster_k: int | None = None,
                  **method_options) -> dict[str, float]:
    """The criterion weights, after checking every option (AutopruneError naming the choices).

    ``method`` is a registered width method (:func:`autoprune.methods.available`; ``search``
    included), ``clusters`` one of :data:`autoprune.grouping.METHODS`, ``cluster_k`` a
    positive int (or None: each clustering's default). ``criterion`` is a name, a mix
    ``"di:0.6,hpse:0.4"`` or ``{"di": 0.6, "hpse": 0.4}`` (:func:`autoprune.criteria.parse_mix`;
    default: the method's ``default_criterion``); only criteria computable from calibration
    alone are accepted (:func:`autoprune.criteria.standalone`). ``method_options`` (and
    ``greedy_mode``) go to the method's own :meth:`~autoprune.methods.WidthMethod.check`.
    Cheap, so callers (the CLI) run it before any training or calibration.
    """
    width_method = methods.get(method)
    if clusters is not None and clusters not in grouping.METHODS:
        raise OptionError(f"unknown clusters {short(clusters)}; choose one of {', '.join(grouping.METHODS)}")
    if cluster_k is not None and (isinstance(cluster_k, bool) or not isinstance(cluster_k, int) or cluster_k < 1):
        raise OptionError(f"cluster_k must be a positive integer (or None: the clustering's default), "
                             f"got {short(cluster_k)}")
    if greedy_mode not in GREEDY_MODES:
        raise OptionError(f"unknown greedy mode {short(greedy_mode)}; choose one of {', '.join(GREEDY_MODES)}")
    if isinstance(calib_images, bool) or not isinstance(calib_images, int) or calib_images < 1:
        raise OptionError(f"calib_images must be a positive integer, got {short(calib_images)}")
    width_method.check({"greedy_mode": greedy_mode, **method_options})
    default = getattr(width_method, "default_criterion", "di")
    weights = criteria_registry.parse_mix(criterion if criterion is not None else default)
    usable = criteria_registry.standalone()
    for name in weights:
        if name not in usable:
            needs = ", ".join(getattr(criteria_registry.get(name), "requires", ()))
            raise CriterionError(f"criterion {name!r} needs inputs prune does not compute yet ({needs}); "
                                 f"use one of {', '.join(usable)}")
    label_based = sorted(n for n in weights if n in LABEL_CRITERIA)  # weight 0 is calibrated too
    if label_based and calib_images < DI_MIN_CALIB_IMAGES:
        raise CriterionError(f"--calib-images {calib_images} is too few for criterion {label_based[0]}, which "
                             f"compares classes: use at least {DI_MIN_CALIB_IMAGES} (default 512)")
    return weights


def check_fits(model: nn.Module, data: DataBundle, device: torch.device | str | None = None,
               batch_size: int = 64) -> None:
    """SizeError unless calibrating and fine-tuning ``model`` on batches of ``data`` (64
    images, with gradients) fits in the memory free on ``device``; run before any work."""
    from .limits import check_forward
    arch = getattr(model, "autoprune_arch", None)
    name = arch.get("name", type(model).__name__) if isinstance(arch, dict) else type(model).__name__
    check_forward(model, data.input_shape, name, batch_size=batch_size, training=True,
                  device=device or evaluate.default_device(), hint="use a smaller --image-size")


# --------------------------------------------------------------------------- calibration, scores


def criterion_params(name: str, num_classes: int) -> dict:
    """The params criterion ``name`` is calibrated and scored with (``di`` needs the class count)."""
    return {"num_classes": num_classes} if name == "di" else {}


def calibration_specs(criteria: Iterable[str], clusters: str | None, cluster_k,
                      num_classes: int) -> list:
    """What one calibration pass must collect: ``name`` or ``(name, params)`` per criterion
    that reads activations, plus the ``hpse``/``fchp`` summaries ``clusters`` needs.

    HPSE fixes its cluster count at calibration, so with ``clusters="hpse"`` an int
    ``cluster_k`` is passed to it as ``k`` (and :func:`autoprune.grouping.cluster` later
    reads the same ``k``).
    """
    names = [n for n in criteria if criteria_registry.get(n).taps()]
    if clusters in ("hpse", "fchp") and clusters not in names:
        names.append(clusters)
    specs = []
    for name in names:
        params = criterion_params(name, num_classes)
        if name == "hpse" and clusters == "hpse" and cluster_k is not None:
            if isinstance(cluster_k, Mapping):
                raise OptionError("cluster_k for clusters 'hpse' must be one integer: HPSE fixes its "
                                     f"cluster count at calibration, got {short(cluster_k)}")
            params["k"] = int(cluster_k)
        specs.append((name, params) if params else name)
    return specs


def criterion_scores(space: Space, stats: Stats | None, names: Iterable[str],
                     num_classes: int) -> dict[str, dict[str, torch.Tensor]]:
    """Per criterion ``name``, its per-unit channel scores (higher = keep)."""
    return {name: criteria_registry.score(name, space, stats, **criterion_params(name, num_classes))
            for name in names}


def mixed_scores(weights: Mapping[str, float],
                 per_criterion: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One criterion: its scores; several: :func:`autoprune.criteria.mix` of them by ``weights``."""
    if len(weights) == 1:
        return dict(per_criterion[next(iter(weights))])
    return criteria_registry.mix(weights, per_criterion)


# --------------------------------------------------------------------------- finish, outputs


def measure(model: nn.Module, data: DataBundle, shape: tuple, device) -> dict:
    """``flops``, ``params``, test ``accuracy``, median ``latency_ms`` and the ``latency`` detail."""
    return evaluate.evaluate(model, data, input_shape=shape, device=device)


def finish(model: nn.Module, small: nn.Module, data: DataBundle, space: Space, budget: Budget,
           widths: Mapping[str, int], seed: int, epochs: int, lr: float, distill: bool,
           bn_batches: int, progress: bool, device) -> dict:
    """Adaptive BN, fine-tune and measure base vs pruned; the report's core."""
    shape = tuple(data.input_shape)
    base = measure(model, data, shape, device)
    evaluate.adaptive_bn(small, data.train, n_batches=bn_batches, seed=seed, device=device)
    after_bn = evaluate.accuracy(small, data.test, device=device)
    history = {}
    if epochs > 0:
        history = evaluate.finetune(small, data, epochs, lr=lr, seed=seed, progress=progress,
                                    teacher=model if distill else None, device=device)
    pruned = measure(small.eval(), data, shape, device)
    pruned["accuracy_adaptive_bn"] = after_bn
    realized = budget.describe(space, widths)
    return {"budget": realized,
            "data": {"name": data.name, "settings": data.settings, "input_shape": list(shape)},
            "base": base, "pruned": pruned, "finetune": {"epochs": epochs, "lr": lr,
                                                         "distill": distill, "history": history},
            "widths": {u.name: [widths[u.name], u.width] for u in space.units}}


def write_outputs(out: Path, plan: Plan, small: nn.Module, report: dict,
                  extra: Mapping[str, Callable[[Path], object]] | None = None):
    """model.pt, plan.json, report.json, widths.png and ``extra`` into ``out`` as one set.

    ``extra`` maps more file names to functions writing that file to the path they are
    given (the search's plots and trials.json). The set replaces the previous one in
    ``out`` as a whole, with ``out/manifest.json`` written last
    (:func:`~autoprune.outputs.output_set`). Returns the committed
    :class:`~autoprune.outputs.OutputSet` (``.replaced``: when the model it replaced
    had been written, or None).
    """
    from .checkpoint import write_json
    from .outputs import output_set
    from .report import plot_widths
    extra = dict(extra or {})
    with output_set(out, ["model.pt", "plan.json", "report.json", "widths.png", *extra]) as files:
        plan.save(files.path("model.pt"), small)
        files.path("plan.json").write_text(plan.to_json())
        write_json(files.path("report.json"), report)
        plot_widths(report["widths"], files.path("widths.png"),
                    title=f"{report['method']} @ {report['budget']['spec']}")
        for name, write in extra.items():
            write(files.path(name))
    return files
