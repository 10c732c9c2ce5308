"""``autoprune.prune``: budget in, pruned and fine-tuned model plus an honest report out.

One pipeline for every width method (:mod:`autoprune.methods`): options checked once →
Space → calibration (once) → scores (a criterion or a mix) → widths from the method,
fitted to the budget → Plan (channels by score, per cluster) → physical pruning →
adaptive BN → fine-tuning → evaluation → report. The shared steps live in
:mod:`autoprune.pipeline`; this module only strings them together.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from . import criteria, evaluate, grouping, methods, pipeline
from .budget import Budget
from .calibrate import calibrate
from .criteria.base import Stats
from .data import DataBundle
from .methods.search import Search
from .methods.search_arms import SearchArm
from .pipeline import Result, check_options
from .plan import select
from .space import Space

__all__ = ["RUN_ONLY", "Result", "SEARCH_ONLY", "check_options", "prune", "prune_settings", "search_run"]
# Result and check_options are re-exported: user code imports them from autoprune.prune,
# where they used to live (they are autoprune.pipeline's now).


def prune(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%",
          method: str = "greedy", criterion: "str | Mapping[str, float] | None" = None,
          clusters: str | None = None, cluster_k: int | None = None, finetune_epochs: int = 5,
          lr: float = 0.01, distill: bool = False, seed: int = 0, calib_images: int = 512,
          bn_batches: int = 50, greedy_mode: str = "accuracy", greedy_step: float = 0.01,
          greedy_bn_batches: int = 2, greedy_recalibrate: int = 0, greedy_rescore: int = 1,
          greedy_cap: float = 0.9, greedy_finetune_every: int = 0, greedy_finetune_steps: int = 100,
          greedy_screen: int = 4, wsp_variant: str = "weight",
          out: str | Path | None = None, progress: bool = True,
          device: str | torch.device | None = None, space=None, trials: int = 64,
          workers: int = 2, address: str | None = None,
          criterion_params: "Mapping[str, Mapping[str, object]] | None" = None,
          sg_k: int = 16, fastnas_batches: int = 50, fastnas_divisor: int = 8) -> Result:
    """Prune ``model`` to ``budget`` on ``data`` and fine-tune it; see the module doc.

    ``method`` is any registered width method (:func:`autoprune.methods.available`).
    ``criterion`` is a name or a mix {name: weight}; by default the method's own (``di``;
    ``wsp``'s saliency for method ``wsp``). ``criterion_params`` sets a criterion's own
    settings, e.g. ``{"fpar": {"lam": 0.5, "steps": 60}}`` (checked before any work); fpar's
    attention is computed on the calibration images with ``seed``, its probes trained where
    the model has no SE gates. ``clusters`` (hpse, fchp, sg) keeps channels
    from every cluster in proportion, ``cluster_k`` clusters per unit (default: the
    clustering's own). Method ``greedy`` runs the DI greedy as its authors do
    (:mod:`autoprune.methods.greedy`): ``greedy_mode="accuracy"`` (default) commits the
    step of ``greedy_step`` of the base cost whose masked network has the highest validation
    accuracy, after adaptive BN on ``greedy_bn_batches`` training batches (0: none);
    ``"criterion"`` (cheap) the least DI lost per FLOP saved (the score lost for criteria other
    than pure di). ``greedy_rescore=N`` re-ranks the kept channels by the criterion on the
    current pruned network every N steps (1: every step, the authors'; 0: never);
    ``greedy_cap`` (0.9) stops cutting a unit that much pruned (lifted only if the budget
    cannot be met otherwise); ``greedy_finetune_every=K`` fine-tunes the working copy for
    ``greedy_finetune_steps`` SGD steps every K steps (0: never; the fine-tuned weights are
    the ones pruned); ``greedy_recalibrate=N`` re-estimates BN statistics under the committed
    structure every N steps; ``greedy_screen=K`` (accuracy mode) scores every candidate on one
    validation batch and only the best K on all of them (0: every candidate on all, the
    authors'). Greedy records each step's validation accuracy in the trajectory.
    Method ``wsp`` removes exactly WSP's weak sub-network (:func:`autoprune.wsp.wsp_plan`:
    it chooses the channels, so ``criterion`` and ``clusters`` do not apply) with saliencies
    from ``wsp_variant`` ``"weight"`` (norms, no calibration) or ``"data"`` (calibrated).
    Method ``selfgroup`` (SG-CNN) removes no channel: it self-groups the layers into
    ``sg_k`` k-means filter groups each (capped at the layer's filters) and cuts connections
    to the budget (:mod:`autoprune.methods.selfgroup`). Method ``fastnas`` (NVIDIA ModelOpt, the
    ``peers`` extra) re-estimates each candidate's BN statistics on ``fastnas_batches`` training
    batches (at least 50) and rounds widths to ``fastnas_divisor`` channels
    (:mod:`autoprune.methods.fastnas`).

    ``method="search"`` runs :func:`autoprune.search.search` (Optuna on Ray Tune) with
    the search space ``space`` (name, YAML path or SearchSpace; default resnet_cifar),
    ``trials``, ``workers`` and ``address``; the space names its criteria and clusters,
    so ``criterion``, ``clusters``, ``cluster_k`` and the greedy options do not apply.

    The comparison's search arms (:mod:`autoprune.methods.search_arms`: ``random``,
    ``search_widths``) run the same way, with their overrides of ``search()``.
    ``report["settings"]`` (:func:`prune_settings`) and ``report["compute"]``
    (:func:`autoprune.pipeline.compute_record`) say what the run depends on and what it spent.

    >>> result = autoprune.prune(model, autoprune.data.load("digits"), "flops<=50%")
    >>> result.report["pruned"]["accuracy"]
    """
    arguments = dict(locals())  # every argument, for report["settings"]
    budget = Budget.parse(budget)
    overrides = search_run(method)
    if overrides is not None:  # search and its arms: a run of the search runner
        from .search import search
        return search(model, data, budget, **({"space": space} if space is not None else {}),
                      trials=trials, workers=workers, address=address, out=out,
                      finetune_epochs=finetune_epochs, lr=lr, distill=distill, seed=seed,
                      calib_images=calib_images, bn_batches=bn_batches, progress=progress, device=device,
                      method=method, **overrides)
    start = time.time()
    options = {"greedy_step": greedy_step, "greedy_bn_batches": greedy_bn_batches,
               "greedy_recalibrate": greedy_recalibrate, "greedy_rescore": greedy_rescore,
               "greedy_cap": greedy_cap, "greedy_finetune_every": greedy_finetune_every,
               "greedy_finetune_steps": greedy_finetune_steps, "greedy_screen": greedy_screen,
               "wsp_variant": wsp_variant, "sg_k": sg_k, "fastnas_batches": fastnas_batches,
               "fastnas_divisor": fastnas_divisor}
    weights = check_options(method, criterion, clusters, greedy_mode, calib_images, cluster_k,
                            criterion_params=criterion_params, **options)
    settings = criteria.check_params(criterion_params, weights)
    run_settings = prune_settings(**arguments)  # before any work: the baseline as given
    options["greedy_mode"] = greedy_mode
    width_method = methods.get(method)
    torch.manual_seed(seed)
    device = torch.device(device) if device else evaluate.default_device()
    pipeline.check_fits(model, data, device)
    model = model.to(device).eval()
    space = Space(model, torch.zeros(1, *data.input_shape, device=device))
    budget.target(space)
    stats = scores = None
    batches = pipeline.calibration_batches(data, seed, calib_images)
    scored = width_method.needs_calibration  # else the method's own Plan picks the channels
    own = width_method.calibrates(options)  # what the method reads itself (wsp_data)
    if scored or own:
        names = list(dict.fromkeys([*weights, *own] if scored else own))
        specs = pipeline.calibration_specs(names, clusters if scored else None, cluster_k, data.num_classes,
                                           settings)
        stats = calibrate(space, model, batches, specs, n_images=calib_images, device=device,
                          progress=progress) if specs else Stats()
    if scored:  # criteria that require more (fpar's attention) compute it on the same images
        scores = pipeline.mixed_scores(weights, pipeline.criterion_scores(
            space, stats, weights, data.num_classes, settings=settings, model=model, batches=batches,
            seed=seed, device=device))
    # the labels the Plan is selected with, known before the widths so the greedy evaluates them
    # (a method that needs no calibration chooses its channels itself: tp_global)
    labels = grouping.cluster(clusters, space, stats, cluster_k) if clusters and scored else None
    context = methods.Context(model, data, space, budget, scores, stats, seed, device, progress, options,
                              clusters=labels, criterion=weights, calibration=batches)
    chosen = width_method.widths(space, budget, context)
    widths = space.complete(chosen.widths)
    if chosen.plan is not None:  # the method chose the channels too (tp_global, wsp)
        plan, weights = chosen.plan, chosen.info.get("criterion", weights)
    else:
        plan = select(space, widths, scores=scores, clusters=labels)
    plan.meta = {**plan.meta, "method": method, "criterion": weights, "budget": str(budget), "seed": seed}
    small = plan.apply(chosen.model if chosen.model is not None else model)  # greedy: its fine-tuned copy
    method_s = time.time() - start  # the method's own cost: everything before the final fine-tune
    report = pipeline.finish(model, small, data, space, budget, widths, seed, finetune_epochs, lr,
                             distill, bn_batches, progress, device, selfgroup=bool(plan.selfgroup))
    report.update(method=method, criterion=weights, clusters=clusters, cluster_k=cluster_k, seed=seed,
                  trajectory=chosen.trajectory, elapsed_s=round(time.time() - start, 2))
    report["compute"] = pipeline.compute_record(chosen.info.get("compute", {}).get("proxy_evaluations"),
                                                method_s, report["finetune"])  # None: the method did not say
    report["settings"] = run_settings
    if method in chosen.info:  # the method's own notes (greedy: mode and rule; wsp: variant, p)
        report[method] = chosen.info[method]
    if out is not None:
        pipeline.write_outputs(Path(out), plan, small, report)
    return Result(small, plan, report)


RUN_ONLY = ("model", "data", "budget", "method", "seed", "out", "progress", "device", "address")
"""prune() arguments that are no option of the run: recorded apart in report["settings"]
(budget, method, seed, the data and the baseline's digest) or without effect on the result."""
SEARCH_ONLY = ("space", "trials", "workers")
"""prune() arguments only a search run reads."""
METHOD_ONLY = {"fastnas_batches": "fastnas", "fastnas_divisor": "fastnas",
               **dict.fromkeys(("greedy_mode", "greedy_step", "greedy_bn_batches", "greedy_recalibrate",
                                "greedy_rescore", "greedy_cap", "greedy_finetune_every", "greedy_finetune_steps",
                                "greedy_screen"), "greedy")}
"""prune() options only one width method reads, recorded in report["settings"] only for that
method: adding or changing such an option leaves every other method's recorded settings,
hence the reuse of its finished runs, as they were. (Runs of versions before 2026-12-03
recorded the greedy's options for every width method; :mod:`autoprune.compare` ignores them
there.)"""


def search_run(method: str) -> dict | None:
    """The ``search()`` overrides of ``method`` if the search runner runs it (``search``: none;
    a search arm: its ``search_options``), or None for a width method; OptionError if unknown."""
    entry = methods.get(method)
    if isinstance(entry, SearchArm):
        return dict(entry.search_options)
    return {} if isinstance(entry, Search) else None


def prune_settings(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%",
                   method: str = "greedy", **kw) -> dict:
    """report["settings"] of ``prune(model, data, budget, method, **kw)``, without running it
    (:func:`autoprune.pipeline.run_settings`): the options are every other argument of
    :func:`prune`, defaults filled in, but :data:`RUN_ONLY`; a width method's without
    :data:`SEARCH_ONLY` and other methods' :data:`METHOD_ONLY`, with the criterion as its
    weights; a search run's as the search runner records them
    (:func:`autoprune.search.runner.search_settings`: the arm's space as a digest, trials,
    workers and the fine-tune's)."""
    bound = inspect.signature(prune).bind(model, data, budget, method, **kw)
    bound.apply_defaults()
    args = bound.arguments
    budget, seed = Budget.parse(args["budget"]), args["seed"]
    overrides = search_run(method)
    if overrides is not None:
        from .search.runner import DEFAULT_SPACE, arm_space, search_settings
        from .search.space import SearchSpace, load
        space = DEFAULT_SPACE if args["space"] is None else args["space"]
        spec = arm_space(space if isinstance(space, SearchSpace) else load(space), overrides.get("sampler"),
                         overrides.get("criterion"))
        return search_settings(model, data, budget, spec, method, seed, trials=args["trials"],
                               workers=args["workers"], finetune_epochs=args["finetune_epochs"], lr=args["lr"],
                               distill=args["distill"], calib_images=args["calib_images"],
                               bn_batches=args["bn_batches"])
    options = {k: v for k, v in args.items()
               if k not in RUN_ONLY + SEARCH_ONLY and METHOD_ONLY.get(k, method) == method}
    given = options["criterion"]
    options["criterion"] = criteria.parse_mix(given if given is not None else methods.get(method).default_criterion)
    return pipeline.run_settings(model, data, budget, method, seed, options)
