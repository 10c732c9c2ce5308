"""One trial without Ray: build a candidate structure and proxy-score it.

:class:`Shared` holds what every trial reads, computed once on the driver. A trial fits its
candidate to the budget, mixes the precomputed scores, selects and prunes channels
(:func:`build_structure`), re-estimates BN, proxy fine-tunes (paused at ASHA's
:func:`rungs`) and scores validation accuracy (:func:`evaluate_candidate`); a diverged
fine-tune scores :data:`PENALTY`. Torch only, so it is tested without Ray.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .. import evaluate
from ..budget import Budget
from ..data import DataBundle
from ..pipeline import mixed_scores
from ..plan import Plan, select
from ..space import Space
from .space import Candidate, SearchSpace

__all__ = ["EVAL_BATCH", "PENALTY", "PROXY_BATCH", "Shared", "build_structure", "evaluate_candidate",
           "rungs"]

PENALTY = -1.0
"""``proxy_score`` a diverged trial reports: finite (samplers and Tune handle it) and below
every real accuracy, so a diverged structure never ranks above a trained one."""

EVAL_BATCH = 256   # images per evaluation batch (eval_batches counts these)
PROXY_BATCH = 64   # proxy fine-tune / adaptive-BN batch size (as evaluate.proxy_finetune)


@dataclass
class Shared:
    """Everything a trial needs, computed once on the driver and put in Ray's object store once.

    ``scores``: criterion → unit → channel scores. ``labels``: cluster-count choice (None:
    the method's default) → unit → cluster labels. ``model`` is the dense base on the CPU
    (also ``space.model``). ``experiment_dir`` is where Tune writes each trial's results.
    ``budget`` may be given as text; it is parsed here, once.
    """

    model: nn.Module
    space: Space
    spec: SearchSpace
    budget: Budget
    scores: dict[str, dict[str, torch.Tensor]]
    labels: dict[int | None, dict[str, np.ndarray]] | None
    data: DataBundle
    seed: int = 0
    threads: int = 1
    experiment_dir: str | None = None

    def __post_init__(self) -> None:
        self.budget = Budget.parse(self.budget)


def rungs(asha: Mapping | None, total: int) -> list[int]:
    """Proxy-step counts at which a trial reports: ASHA's rungs below ``total``, then ``total``.

    ASHA's milestones are ``grace_period · reduction_factor^k``; reporting at the ceiling of
    each lets the scheduler decide at every rung. Without ASHA (or without proxy
    fine-tuning) a trial reports once.
    """
    if not asha or total <= 0:
        return [max(total, 0)]
    g, rf = float(asha["grace_period"]), float(asha["reduction_factor"])
    out, m = [], g
    while m < total:
        step = int(math.ceil(m - 1e-9))
        if not out or step > out[-1]:
            out.append(step)
        m *= rf
    return out + [total] if not out or out[-1] != total else out


def _eval_subset(dataset: Dataset, batches: int) -> Dataset:
    """The first ``batches`` × 256 images of ``dataset`` (the same ones for every trial)."""
    n = min(len(dataset), batches * EVAL_BATCH)
    return dataset if n == len(dataset) else Subset(dataset, range(n))


def _chunked_proxy_finetune(model: nn.Module, dataset: Dataset, milestones: Sequence[int], lr: float,
                            seed: int, device) -> Iterator[int]:
    """The SGD run of :func:`~autoprune.evaluate.proxy_finetune` (same seed, batches and cosine
    schedule over ``milestones[-1]`` steps), paused after each milestone (yields its step count)."""
    from ..train import cross_entropy, sgd, sgd_steps

    total = milestones[-1]
    torch.manual_seed(seed)
    model.to(device)
    batches = itertools.islice(evaluate.training_batches(dataset, PROXY_BATCH, seed), total)
    optimizer, schedule = sgd(model, lr, total, 0.9, 5e-4)
    done = 0
    for milestone in milestones:
        offset = done
        sgd_steps(model, itertools.islice(batches, milestone - done), optimizer, schedule,
                  cross_entropy(), device,
                  diverged=lambda step, loss: evaluate.Diverged(offset + step, loss))
        done = milestone
        yield done


def _candidate_labels(labels: Mapping | None, cand: Candidate, space: Space) -> dict | None:
    """Per unit, the precomputed cluster labels for the candidate's cluster count."""
    if labels is None or cand.cluster_method is None:
        return None
    return {u.name: labels[(cand.cluster_k or {}).get(u.name)][u.name] for u in space.units}


def build_structure(shared: Shared, cand: Candidate) -> tuple[Plan, nn.Module, dict[str, int], int, int]:
    """The candidate's Plan, pruned (and self-grouped) copy of ``shared.model``, widths, FLOPs
    and params (FLOPs/params from the analytic cost model, less what self-grouping saves)."""
    from ..selfgroup import self_group_model, selfgroup_cost_delta

    space, spec = shared.space, shared.spec
    widths = space.fit(cand.ratios, cand.budget(shared.budget), spec.max_ratio)
    used = {name: w for name, w in cand.mix.items() if w > 0}  # one left: that criterion's own scores
    plan = select(space, widths, scores=mixed_scores(used, shared.scores),
                  clusters=_candidate_labels(shared.labels, cand, space))
    small = plan.apply(shared.model)
    cost = space.cost(widths)
    flops, params = cost.flops, cost.params
    if cand.selfgroup:
        small, sg = self_group_model(small, "all", k=int(cand.selfgroup["k"]),
                                     cp=float(cand.selfgroup["cp"]), seed=shared.seed, copy=False)
        plan.selfgroup = sg
        x = torch.zeros(space.input_shape, device=next(small.parameters()).device)
        delta = selfgroup_cost_delta(small, sg, x)
        flops, params = flops - delta.flops, params - delta.params
    return plan, small, widths, int(flops), int(params)


def _check_finite(model: nn.Module, step: int) -> None:
    """Diverged if the last update left a non-finite weight (its loss was still finite)."""
    for p in model.parameters():
        if not bool(torch.isfinite(p).all()):
            raise evaluate.Diverged(step, float("nan"))


def evaluate_candidate(shared: Shared, params: Mapping[str, Any],
                       report: Callable[[dict], None] | None = None, device=None) -> dict:
    """One trial without Ray: build the candidate ``params`` describe and proxy-score it.

    Adaptive BN (``proxy.bn_batches``), proxy fine-tuning (``proxy.finetune_steps`` at
    ``proxy.lr``) and accuracy on the first ``proxy.eval_batches`` validation batches.
    ``report`` (e.g. ``ray.tune.report``) receives the metrics at every ASHA rung and at
    the end; the final metrics are also returned. A diverged fine-tune gives
    ``proxy_score = PENALTY`` and ``diverged = True``. Timings: ``time_prepare_s`` (fit,
    select, prune), ``time_compute_s`` (adaptive BN, fine-tune, evaluation) and
    ``time_trial_s`` (everything).
    """
    start, started_at = time.perf_counter(), time.time()
    spec = shared.spec
    device = torch.device(device) if device is not None else evaluate.default_device()
    cand = spec.candidate(params, shared.space)
    proxy = spec.proxy
    _, small, _, flops, nparams = build_structure(shared, cand)
    small.to(device)
    base = {"flops": flops, "params": nparams, "budget_scale": cand.budget_scale,
            "diverged": False, "error": ""}
    prepared = time.perf_counter()
    evalset = _eval_subset(shared.data.val, int(proxy.eval_batches))
    steps_total = int(proxy.finetune_steps)
    milestones = rungs(spec.asha, steps_total)
    compute = 0.0

    def metrics(score: float, steps: int, final: bool, **extra) -> dict:
        now = time.perf_counter()
        return {**base, "proxy_score": float(score), "proxy_steps": steps, "final": final,
                "started_at": started_at, "time_prepare_s": prepared - start, "time_compute_s": compute,
                "time_trial_s": now - start, **extra}

    out = None
    t = time.perf_counter()
    try:
        if proxy.bn_batches:
            evaluate.adaptive_bn(small, shared.data.train, n_batches=int(proxy.bn_batches),
                                 batch_size=PROXY_BATCH, seed=shared.seed, device=device)
        if len(milestones) == 1:  # no early stopping: the library's proxy fine-tune as is
            if steps_total:
                evaluate.proxy_finetune(small, shared.data.train, steps=steps_total, lr=proxy.lr,
                                        batch_size=PROXY_BATCH, seed=shared.seed, device=device)
            _check_finite(small, steps_total)
            score = evaluate.accuracy(small, evalset, batch_size=EVAL_BATCH, device=device)
            compute += time.perf_counter() - t
            out = metrics(score, steps_total, True)
        else:
            for steps in _chunked_proxy_finetune(small, shared.data.train, milestones, proxy.lr,
                                                 shared.seed, device):
                _check_finite(small, steps)
                score = evaluate.accuracy(small, evalset, batch_size=EVAL_BATCH, device=device)
                compute += time.perf_counter() - t
                out = metrics(score, steps, steps == steps_total)
                if report is not None and not out["final"]:
                    report(out)
                t = time.perf_counter()
    except evaluate.Diverged as exc:
        compute += time.perf_counter() - t
        out = metrics(PENALTY, exc.step, True, diverged=True, error=str(exc))
    if report is not None:
        report(out)
    return out
