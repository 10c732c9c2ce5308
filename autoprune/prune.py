"""``autoprune.prune``: budget in, pruned and fine-tuned model plus an honest report out.

One pipeline for every width method (:mod:`autoprune.methods`): options checked once →
Space → calibration (once) → scores (a criterion or a mix) → widths from the method,
fitted to the budget → Plan (channels by score, per cluster) → physical pruning →
adaptive BN → fine-tuning → evaluation → report. The shared steps live in
:mod:`autoprune.pipeline`; this module only strings them together.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from . import evaluate, grouping, methods, pipeline
from .budget import Budget
from .calibrate import calibrate
from .criteria.base import Stats
from .data import DataBundle, loader
from .pipeline import Result, check_options
from .plan import select
from .space import Space

__all__ = ["Result", "check_options", "prune"]
# Result and check_options are re-exported: user code imports them from autoprune.prune,
# where they used to live (they are autoprune.pipeline's now).


def prune(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%",
          method: str = "greedy", criterion: "str | Mapping[str, float] | None" = None,
          clusters: str | None = None, cluster_k: int | None = None, finetune_epochs: int = 5,
          lr: float = 0.01, distill: bool = False, seed: int = 0, calib_images: int = 512,
          bn_batches: int = 50, greedy_mode: str = "criterion", greedy_step: float = 0.005,
          greedy_bn_batches: int = 5, greedy_recalibrate: int = 0, wsp_variant: str = "weight",
          out: str | Path | None = None, progress: bool = True,
          device: str | torch.device | None = None, space=None, trials: int = 64,
          workers: int = 2, address: str | None = None) -> Result:
    """Prune ``model`` to ``budget`` on ``data`` and fine-tune it; see the module doc.

    ``method`` is any registered width method (:func:`autoprune.methods.available`).
    ``criterion`` is a name or a mix {name: weight}; by default the method's own (``di``;
    ``wsp``'s saliency for method ``wsp``). ``clusters`` (hpse, fchp, sg) keeps channels
    from every cluster in proportion, ``cluster_k`` clusters per unit (default: the
    clustering's own). ``greedy_mode="accuracy"`` scores greedy steps by
    validation accuracy (the DI authors' way) instead of the score lost per FLOP saved, each
    candidate after adaptive BN on ``greedy_bn_batches`` training batches (0: none);
    ``greedy_recalibrate=N`` re-estimates BN statistics under the committed structure
    every N steps. Greedy records each step's validation accuracy in the trajectory.
    Method ``wsp`` removes exactly WSP's weak sub-network (:func:`autoprune.wsp.wsp_plan`:
    it chooses the channels, so ``criterion`` and ``clusters`` do not apply) with saliencies
    from ``wsp_variant`` ``"weight"`` (norms, no calibration) or ``"data"`` (calibrated).

    ``method="search"`` runs :func:`autoprune.search.search` (Optuna on Ray Tune) with
    the search space ``space`` (name, YAML path or SearchSpace; default resnet_cifar),
    ``trials``, ``workers`` and ``address``; the space names its criteria and clusters,
    so ``criterion``, ``clusters``, ``cluster_k`` and the greedy options do not apply.

    >>> result = autoprune.prune(model, autoprune.data.load("digits"), "flops<=50%")
    >>> result.report["pruned"]["accuracy"]
    """
    budget = Budget.parse(budget)
    if method == "search":
        from .search import search
        return search(model, data, budget, **({"space": space} if space is not None else {}),
                      trials=trials, workers=workers, address=address, out=out,
                      finetune_epochs=finetune_epochs, lr=lr, distill=distill, seed=seed,
                      calib_images=calib_images, bn_batches=bn_batches, progress=progress, device=device)
    start = time.time()
    options = {"greedy_step": greedy_step, "greedy_bn_batches": greedy_bn_batches,
               "greedy_recalibrate": greedy_recalibrate, "wsp_variant": wsp_variant}
    weights = check_options(method, criterion, clusters, greedy_mode, calib_images, cluster_k, **options)
    options["greedy_mode"] = greedy_mode
    width_method = methods.get(method)
    torch.manual_seed(seed)
    device = torch.device(device) if device else evaluate.default_device()
    pipeline.check_fits(model, data, device)
    model = model.to(device).eval()
    space = Space(model, torch.zeros(1, *data.input_shape, device=device))
    budget.target(space)
    stats = scores = None
    scored = width_method.needs_calibration  # else the method's own Plan picks the channels
    own = width_method.calibrates(options)  # what the method reads itself (wsp_data)
    if scored or own:
        names = list(dict.fromkeys([*weights, *own] if scored else own))
        specs = pipeline.calibration_specs(names, clusters if scored else None, cluster_k, data.num_classes)
        stats = calibrate(space, model, loader(data.train, batch_size=64, shuffle=True, seed=seed), specs,
                          n_images=calib_images, device=device, progress=progress) if specs else Stats()
    if scored:
        scores = pipeline.mixed_scores(weights, pipeline.criterion_scores(space, stats, weights,
                                                                          data.num_classes))
    # the labels the Plan is selected with, known before the widths so the greedy evaluates them
    # (a method that needs no calibration chooses its channels itself: tp_global)
    labels = grouping.cluster(clusters, space, stats, cluster_k) if clusters and scored else None
    context = methods.Context(model, data, space, budget, scores, stats, seed, device, progress, options,
                              clusters=labels)
    chosen = width_method.widths(space, budget, context)
    widths = space.complete(chosen.widths)
    if chosen.plan is not None:  # the method chose the channels too (tp_global, wsp)
        plan, weights = chosen.plan, chosen.info.get("criterion", weights)
    else:
        plan = select(space, widths, scores=scores, clusters=labels)
    plan.meta = {**plan.meta, "method": method, "criterion": weights, "budget": str(budget), "seed": seed}
    small = plan.apply(model)
    report = pipeline.finish(model, small, data, space, budget, widths, seed, finetune_epochs, lr,
                             distill, bn_batches, progress, device)
    report.update(method=method, criterion=weights, clusters=clusters, cluster_k=cluster_k, seed=seed,
                  trajectory=chosen.trajectory, elapsed_s=round(time.time() - start, 2))
    if method in chosen.info:  # the method's own notes (greedy: mode and rule; wsp: variant, p)
        report[method] = chosen.info[method]
    if out is not None:
        pipeline.write_outputs(Path(out), plan, small, report)
    return Result(small, plan, report)
