"""The steps every width method shares, written once: check, calibrate, score, finish, write.

``check_options`` validates every option before any work (AutopruneError naming the
parameter, the value and the choices); ``calibration_specs`` says what one calibration
pass must collect for the criteria and the clusters (HPSE's ``k`` included),
``calibration_batches`` which images it reads; ``criterion_scores``/``mixed_scores`` turn
the summaries (and what a criterion computes itself on the same images: fpar's attention)
into per-unit scores (one criterion: its scores; several: :func:`autoprune.criteria.mix`);
``finish`` adapts BN, fine-tunes and measures base vs pruned; ``write_outputs`` writes the
run's files as one set.
:func:`autoprune.prune` and the search runner are these steps plus a width method.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import criteria as criteria_registry
from . import evaluate, grouping, methods
from .budget import TOLERANCE, Budget
from .criteria.base import Stats
from .data import DataBundle, loader
from .errors import CriterionError, OptionError, short
from .greedy import MODES as GREEDY_MODES
from .plan import Plan
from .space import Space

__all__ = ["CalibrationBatches", "DI_MIN_CALIB_IMAGES", "LABEL_CRITERIA", "Result", "calibration_batches",
           "calibration_specs", "check_fits",
           "check_options", "criterion_params", "criterion_scores", "finish", "measure", "mixed_scores",
           "measured_budget", "write_outputs", "baseline_digest", "compute_record", "release", "run_settings"]


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
                  clusters: str | None = None, greedy_mode: str = "accuracy",
                  calib_images: int = 512, cluster_k: int | None = None,
                  criterion_params: "Mapping[str, Mapping[str, object]] | None" = None,
                  **method_options) -> dict[str, float]:
    """The criterion weights, after checking every option (AutopruneError naming the choices).

    ``method`` is a registered width method (:func:`autoprune.methods.available`; ``search``
    included), ``clusters`` one of :data:`autoprune.grouping.METHODS`, ``cluster_k`` a
    positive int (or None: each clustering's default). ``criterion`` is a name, a mix
    ``"di:0.6,hpse:0.4"`` or ``{"di": 0.6, "hpse": 0.4}`` (:func:`autoprune.criteria.parse_mix`;
    default: the method's ``default_criterion``). ``criterion_params`` ``{criterion: {setting:
    value}}`` are checked by each criterion (:func:`autoprune.criteria.check_params`: only
    criteria of the mix, only their ``settings``). ``method_options`` (and
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
    reason = width_method.available()
    if reason is not None:
        raise OptionError(reason)
    width_method.check({"greedy_mode": greedy_mode, **method_options})
    default = getattr(width_method, "default_criterion", "di")
    weights = criteria_registry.parse_mix(criterion if criterion is not None else default)
    criteria_registry.check_params(criterion_params, weights)
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


def criterion_params(name: str, num_classes: int,
                     settings: "Mapping[str, Mapping[str, object]] | None" = None) -> dict:
    """The params criterion ``name`` is calibrated and scored with: the user's ``settings``
    of it (checked by :func:`check_options`), and the class count ``di`` needs."""
    return {**(settings or {}).get(name, {}), **({"num_classes": num_classes} if name == "di" else {})}


class CalibrationBatches:
    """The calibration images as (images, labels) batches: the first ``n_images`` of ``dataset``
    in the order ``seed`` shuffles it. Every pass yields the same images, random augmentations
    included (they draw from a torch RNG state of their own, seeded by ``seed``; the caller's is
    left as it was), so calibration and what a criterion computes besides (fpar's attention,
    :meth:`~autoprune.criteria.Criterion.inputs`) read the same images."""

    def __init__(self, dataset, n_images: int, seed: int = 0, batch_size: int = 64) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.n_images, self.seed = int(n_images), int(seed)

    def __iter__(self):
        own = torch.Generator().manual_seed(self.seed).get_state()
        batches, left = None, self.n_images
        while left > 0:
            outer = torch.get_rng_state()
            torch.set_rng_state(own)
            try:
                if batches is None:
                    batches = iter(loader(self.dataset, self.batch_size, shuffle=True, seed=self.seed))
                x, y = next(batches, (None, None))
            finally:
                own = torch.get_rng_state()
                torch.set_rng_state(outer)
            if x is None:
                return
            yield x[:left], y[:left]
            left -= len(x)


def calibration_batches(data: DataBundle, seed: int, n_images: int) -> CalibrationBatches:
    """The calibration images of a run: ``n_images`` training images, shuffled by ``seed``."""
    return CalibrationBatches(data.train, n_images, seed)


def calibration_specs(criteria: Iterable[str], clusters: str | None, cluster_k,
                      num_classes: int, settings: "Mapping[str, Mapping[str, object]] | None" = None) -> list:
    """What one calibration pass must collect: ``name`` or ``(name, params)`` per criterion
    that reads activations, plus the ``hpse``/``fchp`` summaries ``clusters`` needs.

    HPSE fixes its cluster count at calibration, so with ``clusters="hpse"`` an int
    ``cluster_k`` is passed to it as ``k`` (and :func:`autoprune.grouping.cluster` later
    reads the same ``k``). ``settings``: the user's criterion settings (:func:`criterion_params`).
    """
    names = [n for n in criteria if criteria_registry.get(n).taps()]
    if clusters in ("hpse", "fchp") and clusters not in names:
        names.append(clusters)
    specs = []
    for name in names:
        params = criterion_params(name, num_classes, settings)
        if name == "hpse" and clusters == "hpse" and cluster_k is not None:
            if isinstance(cluster_k, Mapping):
                raise OptionError("cluster_k for clusters 'hpse' must be one integer: HPSE fixes its "
                                     f"cluster count at calibration, got {short(cluster_k)}")
            params["k"] = int(cluster_k)
        specs.append((name, params) if params else name)
    return specs


def criterion_scores(space: Space, stats: Stats | None, names: Iterable[str], num_classes: int, *,
                     settings: "Mapping[str, Mapping[str, object]] | None" = None,
                     model: nn.Module | None = None, batches: Iterable | None = None, seed: int = 0,
                     device=None) -> dict[str, dict[str, torch.Tensor]]:
    """Per criterion ``name``, its per-unit channel scores (higher = keep), with the user's
    ``settings``. A criterion that ``requires`` more than the summaries (fpar: its
    attention) first computes it (:meth:`~autoprune.criteria.Criterion.inputs`) from ``model``
    on ``batches`` (the calibration images: :func:`calibration_batches`) with ``seed``."""
    return {name: criteria_registry.score_with_inputs(name, space, stats, model, batches,
                                                      criterion_params(name, num_classes, settings),
                                                      seed=seed, device=device)
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
           bn_batches: int, progress: bool, device, selfgroup: bool = False) -> dict:
    """Adaptive BN, fine-tune and measure base vs pruned; the report's core. With ``selfgroup``
    (the Plan self-groups layers) the budget's realized cost is ``small``'s measured one
    (:func:`measured_budget`)."""
    shape = tuple(data.input_shape)
    base = measure(model, data, shape, device)
    evaluate.adaptive_bn(small, data.train, n_batches=bn_batches, seed=seed, device=device)
    after_bn = evaluate.accuracy(small, data.test, device=device)
    history, started = {}, time.time()
    if epochs > 0:
        history = evaluate.finetune(small, data, epochs, lr=lr, seed=seed, progress=progress,
                                    teacher=model if distill else None, device=device)
    finetune_s = round(time.time() - started, 3)
    pruned = measure(small.eval(), data, shape, device)
    pruned["accuracy_adaptive_bn"] = after_bn
    realized = measured_budget(budget, space, widths, pruned) if selfgroup else budget.describe(space, widths)
    return {"budget": realized,
            "data": {"name": data.name, "settings": data.settings, "input_shape": list(shape)},
            "base": base, "pruned": pruned, "finetune": {"epochs": epochs, "lr": lr, "distill": distill,
                                                         "history": history, "wall_s": finetune_s},
            "widths": {u.name: [widths[u.name], u.width] for u in space.units}}


def measured_budget(budget: Budget, space: Space, widths: Mapping[str, int], pruned: Mapping) -> dict:
    """``budget.describe(space, widths)`` with ``realized`` the cost measured on the model
    produced (``pruned``: :func:`measure`'s fvcore counts) and the widths' analytic cost kept
    as ``realized_channels``: for a Plan that self-groups, whose grouped layers the
    widths' cost model does not see."""
    b = budget.describe(space, widths)
    b["realized_channels"], b["realized"] = b["realized"], pruned[b["kind"]]
    b["realized_ratio"] = b["realized"] / b["base"]
    b["within_tolerance"] = b["target"] * (1 - TOLERANCE) <= b["realized"] <= b["target"]
    return b


def compute_record(proxy_evaluations: int | None, method_s: float, finetune: Mapping) -> dict:
    """report["compute"], what a run spent: ``proxy_evaluations`` (candidate structures the
    method scored: masked-accuracy evaluations, proxy-fine-tuned trials, FastNAS scores; the
    method's ``WidthResult.info["compute"]``, or a search's evaluated trials; None if the method
    does not say), ``method_s`` (wall time to the pruned structure: calibration, scores and the
    method's own evaluations, before adaptive BN, the final fine-tune and measuring), the
    full fine-tunes (``finetunes``: 1, or 0 with no epochs) and their wall time
    (``finetune_s``, from :func:`finish`), and ``search_cost`` = method_s / finetune_s (None
    without a fine-tune)."""
    finetune_s = float(finetune["wall_s"])
    finetunes = 1 if finetune["epochs"] > 0 else 0
    method_s = round(method_s, 3)  # the ratio is of the numbers recorded
    return {"proxy_evaluations": proxy_evaluations, "method_s": method_s, "finetunes": finetunes,
            "finetune_s": finetune_s,
            "search_cost": round(method_s / finetune_s, 6) if finetunes and finetune_s > 0 else None}


def baseline_digest(model: nn.Module) -> str:
    """SHA-256 of ``model``'s state_dict (every entry's name, dtype, shape and bytes, in
    order): which baseline a run pruned."""
    import hashlib

    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_settings(model: nn.Module, data: DataBundle, budget: Budget, method: str, seed: int,
                 options: Mapping) -> dict:
    """report["settings"], everything a run's result depends on, in one shape for every method:
    the data (name and split settings), the baseline (:func:`baseline_digest`), the budget (as
    numbers), method, seed, the method's ``options`` (by their ``prune()`` names, the fine-tune's
    included; a search space as its digest) and autoprune's version. A comparison reuses a
    finished run only when these are equal (:func:`autoprune.compare.compare`)."""
    return {"data": {"name": data.name, "settings": dict(data.settings)}, "baseline": baseline_digest(model),
            "budget": {"kind": budget.kind, "value": budget.value, "relative": budget.relative},
            "method": method, "seed": seed, "options": dict(options), "autoprune": release()}


def release() -> str:
    """autoprune's installed version ("not installed" when run from a source tree never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autoprune")
    except PackageNotFoundError:
        return "not installed"


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
