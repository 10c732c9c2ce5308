"""``autoprune.prune``: budget in, pruned and fine-tuned model plus an honest report out.

One pipeline for every width method: Space → calibration (once) → scores (a
criterion or a mix) → widths (uniform, greedy or WSP, each fitted to the budget)
→ Plan → physical pruning → adaptive BN → fine-tuning → evaluation → report.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from . import criteria as _criteria
from . import evaluate, grouping
from .budget import Budget, _fill
from .calibrate import calibrate
from .criteria.base import Stats
from .cost import fvcore_cost
from .data import DataBundle, loader
from .errors import AutopruneError, CriterionError, short
from .greedy import MaskedEvaluator, greedy_widths
from .plan import Plan, select
from .space import Space
from .tp_baseline import tp_global_plan

METHODS = ("uniform", "greedy", "wsp", "tp_global")
CLUSTER_METHODS = ("hpse", "fchp", "sg")
GREEDY_MODES = ("criterion", "accuracy")


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


def check_options(method: str, criterion: "str | Mapping[str, float] | None" = None,
                  clusters: str | None = None, greedy_mode: str = "criterion",
                  calib_images: int = 512) -> dict[str, float]:
    """The criterion weights, after checking every option (AutopruneError naming the choices).

    ``criterion`` is a name, a mix ``"di:0.6,hpse:0.4"`` or ``{"di": 0.6, "hpse": 0.4}``
    (:func:`autoprune.criteria.parse_mix`); only criteria prune can compute from
    calibration alone are accepted (:func:`autoprune.criteria.standalone`). Cheap, so
    callers (the CLI) run it before any training or calibration.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise AutopruneError(f"unknown method {short(method)}; choose one of {', '.join(METHODS)}"
                             " (or search: autoprune search / method='search')")
    if clusters is not None and clusters not in CLUSTER_METHODS:
        raise AutopruneError(f"unknown clusters {short(clusters)}; choose one of {', '.join(CLUSTER_METHODS)}")
    if greedy_mode not in GREEDY_MODES:
        raise AutopruneError(f"unknown greedy mode {short(greedy_mode)}; choose one of {', '.join(GREEDY_MODES)}")
    if isinstance(calib_images, bool) or not isinstance(calib_images, int) or calib_images < 1:
        raise AutopruneError(f"calib_images must be a positive integer, got {short(calib_images)}")
    weights = _criteria.parse_mix(criterion if criterion is not None else ("wsp" if method == "wsp" else "di"))
    usable = _criteria.standalone()
    for name in weights:
        if name not in usable:
            needs = ", ".join(getattr(_criteria.get(name), "requires", ()))
            raise CriterionError(f"criterion {name!r} needs inputs prune does not compute yet ({needs}); "
                                 f"use one of {', '.join(usable)}")
    label_based = sorted(n for n in weights if n in ("di", "di_fullmap"))  # weight 0 is calibrated too
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


def _calibration_specs(weights: Mapping[str, float], clusters: str | None, num_classes: int) -> list:
    names = [n for n in weights if _criteria.get(n).taps()]
    if clusters in ("hpse", "fchp") and clusters not in names:
        names.append(clusters)
    return [(n, {"num_classes": num_classes}) if n == "di" else n for n in names]


def _scores(space: Space, stats, weights: Mapping[str, float], num_classes: int) -> dict:
    def one(name):
        params = {"num_classes": num_classes} if name == "di" else {}
        return _criteria.score(name, space, stats, **params)
    if len(weights) == 1:
        return one(next(iter(weights)))
    return _criteria.mix(weights, {n: one(n) for n in weights})


def choose_widths(method: str, space: Space, budget: Budget, scores: dict, stats,
                  evaluator: MaskedEvaluator | None = None, greedy_mode: str = "criterion",
                  greedy_step: float = 0.005, recalibrate_every: int = 0, wsp_variant: str = "weight",
                  progress: bool = True) -> tuple[dict[str, int], list[dict]]:
    """Widths meeting ``budget`` by ``method``, and its trajectory (greedy only)."""
    if method == "uniform":
        return space.fit({u.name: 0.5 for u in space.units}, budget), []
    if method == "greedy":
        result = greedy_widths(space, scores, budget, step=greedy_step, mode=greedy_mode,
                               evaluator=evaluator, recalibrate_every=recalibrate_every,
                               progress=progress)
        return result.widths, result.trajectory
    if method == "wsp":  # the weak set at the smallest p that fits, then topped up to the budget
        from .wsp import wsp_widths
        widths = wsp_widths(space, stats, budget=budget, variant=wsp_variant)
        wanted = np.array([widths[u.name] for u in space.units], dtype=float)
        return _fill(space, widths, wanted, budget.kind, budget.target(space)), []
    raise AutopruneError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def prune(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%",
          method: str = "greedy", criterion: "str | Mapping[str, float] | None" = None,
          clusters: str | None = None, cluster_k: int | None = None, finetune_epochs: int = 5,
          lr: float = 0.01, distill: bool = False, seed: int = 0, calib_images: int = 512,
          bn_batches: int = 50, greedy_mode: str = "criterion", greedy_step: float = 0.005,
          greedy_bn_batches: int = 5, greedy_recalibrate: int = 0, out: str | Path | None = None, progress: bool = True,
          device: str | torch.device | None = None, space=None, trials: int = 64,
          workers: int = 2, address: str | None = None) -> Result:
    """Prune ``model`` to ``budget`` on ``data`` and fine-tune it; see the module doc.

    ``criterion`` is a name or a mix {name: weight}; by default ``di`` (``wsp``'s own
    saliency for method ``wsp``). ``clusters`` (hpse, fchp, sg) keeps channels from
    every cluster in proportion. ``greedy_mode="accuracy"`` scores greedy steps by
    validation accuracy (the DI authors' way) instead of criterion loss per FLOP, each
    candidate after adaptive BN on ``greedy_bn_batches`` training batches (0: none);
    ``greedy_recalibrate=N`` re-estimates BN statistics under the committed structure
    every N steps. Greedy records each step's validation accuracy in the trajectory.

    ``method="search"`` runs :func:`autoprune.search.tune.search` (Optuna on Ray Tune) with
    the search space ``space`` (name, YAML path or SearchSpace; default resnet_cifar),
    ``trials``, ``workers`` and ``address``; the space names its criteria and clusters,
    so ``criterion``, ``clusters``, ``cluster_k`` and the greedy options do not apply.

    >>> result = autoprune.prune(model, autoprune.data.load("digits"), "flops<=50%")
    >>> result.report["pruned"]["accuracy"]
    """
    if method == "search":
        from .search.tune import DEFAULT_SPACE, search
        return search(model, data, budget, space=space if space is not None else DEFAULT_SPACE,
                      trials=trials, workers=workers, address=address, out=out,
                      finetune_epochs=finetune_epochs, lr=lr, distill=distill, seed=seed,
                      calib_images=calib_images, bn_batches=bn_batches, progress=progress, device=device)
    start = time.time()
    weights = check_options(method, criterion, clusters, greedy_mode, calib_images)
    budget = Budget.parse(budget)
    torch.manual_seed(seed)
    device = torch.device(device) if device else evaluate.default_device()
    check_fits(model, data, device)
    model = model.to(device).eval()
    space = Space(model, torch.zeros(1, *data.input_shape, device=device))
    budget.target(space)
    if method == "tp_global":  # Torch-Pruning's own global magnitude choice, no calibration
        plan, trajectory = tp_global_plan(space, budget), []
        widths, weights = space.complete(plan.kept_widths()), {"tp_magnitude": 1.0}
    else:
        greedy = {"mode": greedy_mode, "step": greedy_step, "bn_batches": greedy_bn_batches,
                  "recalibrate_every": greedy_recalibrate}
        plan, widths, trajectory = _plan(method, model, data, space, budget, weights, clusters,
                                         cluster_k, seed, calib_images, greedy, progress, device)
    plan.meta = {"method": method, "criterion": weights, "budget": str(budget), "seed": seed}
    small = plan.apply(model)
    report = _finish(model, small, data, space, budget, widths, seed, finetune_epochs, lr,
                     distill, bn_batches, progress, device)
    report.update(method=method, criterion=weights, clusters=clusters, seed=seed,
                  trajectory=trajectory, elapsed_s=round(time.time() - start, 2))
    if out is not None:
        write_outputs(Path(out), plan, small, report)
    return Result(small, plan, report)


def _plan(method, model, data, space, budget, weights, clusters, cluster_k, seed, calib_images,
          greedy, progress, device) -> tuple[Plan, dict, list]:
    """Calibrate once, score, choose widths by ``method`` and select channels."""
    batches = loader(data.train, batch_size=64, shuffle=True, seed=seed)
    specs = _calibration_specs(weights, clusters, data.num_classes)
    stats = calibrate(space, model, batches, specs, n_images=calib_images, device=device,
                      progress=progress) if specs else Stats()
    scores = _scores(space, stats, weights, data.num_classes)
    evaluator = _evaluator(model, space, data, seed, greedy["bn_batches"]) if method == "greedy" else None
    widths, trajectory = choose_widths(method, space, budget, scores, stats, evaluator, greedy["mode"],
                                       greedy["step"], greedy["recalibrate_every"], progress=progress)
    labels = grouping.cluster(clusters, space, stats, cluster_k) if clusters else None
    return select(space, widths, scores=scores, clusters=labels), widths, trajectory


GREEDY_VAL_BATCHES = 8
"""Validation batches of 256 images the greedy scores each step on (accuracy mode, trajectory)."""


def _evaluator(model, space, data, seed, bn_batches: int) -> MaskedEvaluator:
    """Masked accuracy on the first validation batches, after adaptive BN on ``bn_batches``."""
    val = list(itertools.islice(loader(data.val, batch_size=256), GREEDY_VAL_BATCHES))
    train = list(itertools.islice(loader(data.train, batch_size=64, shuffle=True, seed=seed), bn_batches))
    return MaskedEvaluator(model, space, val, train, bn_fn=lambda m, b: evaluate.adaptive_bn(m, b))


def _finish(model, small, data, space, budget, widths, seed, epochs, lr, distill, bn_batches,
            progress, device) -> dict:
    """Adaptive BN, fine-tune and measure base vs pruned; the report's core."""
    shape = tuple(data.input_shape)
    base = _measure(model, data, shape, device)
    evaluate.adaptive_bn(small, data.train, n_batches=bn_batches, seed=seed, device=device)
    after_bn = evaluate.accuracy(small, data.test, device=device)
    history = {}
    if epochs > 0:
        history = evaluate.finetune(small, data, epochs, lr=lr, seed=seed, progress=progress,
                                    teacher=model if distill else None, device=device)
    pruned = _measure(small.eval(), data, shape, device)
    pruned["accuracy_adaptive_bn"] = after_bn
    realized = budget.describe(space, widths)
    return {"budget": realized,
            "data": {"name": data.name, "settings": data.settings, "input_shape": list(shape)},
            "base": base, "pruned": pruned, "finetune": {"epochs": epochs, "lr": lr,
                                                         "distill": distill, "history": history},
            "widths": {u.name: [widths[u.name], u.width] for u in space.units}}


def _measure(model: nn.Module, data: DataBundle, shape: tuple, device) -> dict:
    cost = fvcore_cost(model, torch.zeros(1, *shape, device=device))
    lat = evaluate.latency(model, shape, batch_size=1, device=device)
    return {"flops": cost.flops, "params": cost.params,
            "accuracy": evaluate.accuracy(model, data.test, device=device),
            "latency_ms": lat["median_ms"], "latency": lat}


def write_outputs(out: Path, plan: Plan, small: nn.Module, report: dict,
                  extra: Mapping[str, Callable[[Path], object]] | None = None):
    """model.pt, plan.json, report.json, widths.png and ``extra`` into ``out`` as one set.

    ``extra`` maps more file names to functions writing that file to the path they are
    given (the search's plots and trials.json). The set replaces the previous one in
    ``out`` as a whole, with ``out/manifest.json`` written last
    (:func:`~autoprune.checkpoint.output_set`). Returns the committed
    :class:`~autoprune.checkpoint.OutputSet` (``.replaced``: when the model it replaced
    had been written, or None).
    """
    from .checkpoint import output_set, write_json
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
