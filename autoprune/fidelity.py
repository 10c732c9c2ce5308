"""Proxy fidelity: how well the search's cheap proxy ranks structures the way the full fine-tune does.

``n`` structures are drawn at random from a search space (Optuna's RandomSampler, seeded),
fitted to every budget and scored by each proxy — adaptive BN alone, then adaptive BN plus
each proxy fine-tuning length the space offers — and by test accuracy after the runs' own
recipe (adaptive BN, then the full fine-tune). Per budget and proxy: Kendall τ-b between
proxy score and final accuracy (:func:`scipy.stats.kendalltau`), a percentile bootstrap
interval over structures (:func:`bootstrap_tau`), the number of tied proxy pairs, and what
ranking by the proxy buys (:func:`best_of_k`): the expected final accuracy of the proxy-best of
``k`` structures drawn from the ``n`` — the search's situation with ``k`` trials — beside an
unranked pick and the best of the ``k`` by final accuracy itself.
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.stats import kendalltau
from torch import nn

from . import evaluate
from .budget import Budget
from .data import DataBundle
from .errors import OptionError, short
from .fidelity_progress import PROGRESS_FILE, Progress, study_settings
from .search.space import SearchSpace
from .search.validate import Section

__all__ = ["DEFAULT_N", "DEFAULT_PICK", "MAX_N", "MAX_RESAMPLES", "best_of_k", "bootstrap_tau", "check_options",
           "kendall_tau", "markdown", "proxies", "proxy_fidelity", "tau_rows", "tied_pairs", "write_fidelity"]

DEFAULT_N = 24
"""Structures per budget (the τ of 12 structures with 5 tied proxy scores said little)."""
MAX_N = 10_000
DEFAULT_PICK = 16
"""``k`` of :func:`best_of_k`: the search's and its arms' trials in ``compare`` (capped at ``n``)."""
MAX_RESAMPLES = 1_000_000
BN_ONLY = "adaptive_bn"
"""The name of the proxy without fine-tuning (adaptive BN, then validation accuracy)."""


# --------------------------------------------------------------------------- statistics (pure)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall τ-b of ``x`` and ``y`` (scipy); None where it is undefined (a constant side)."""
    tau = float(kendalltau(np.asarray(x, float), np.asarray(y, float), variant="b").statistic)
    return None if math.isnan(tau) else tau


def tied_pairs(values: Sequence[float]) -> int:
    """Pairs ``i < j`` with ``values[i] == values[j]`` (exact equality)."""
    _, counts = np.unique(np.asarray(values, float), return_counts=True)
    return int(sum(c * (c - 1) // 2 for c in counts.tolist()))


def _taus(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """τ-b of every resample (a row of ``index``): Σ sign(Δx)·sign(Δy) over pairs divided by
    √(pairs untied in x · pairs untied in y), the definition scipy computes; NaN where undefined."""
    out = np.empty(len(index))
    chunk = max(1, 4_000_000 // max(1, index.shape[1] ** 2))  # bounded memory for large n
    for start in range(0, len(index), chunk):
        xs, ys = x[index[start:start + chunk]], y[index[start:start + chunk]]
        sx = np.sign(xs[:, :, None] - xs[:, None, :])
        sy = np.sign(ys[:, :, None] - ys[:, None, :])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + chunk] = (sx * sy).sum((1, 2)) / np.sqrt((sx * sx).sum((1, 2)) * (sy * sy).sum((1, 2)))
    return out


def bootstrap_tau(x: Sequence[float], y: Sequence[float], resamples: int = 2000, seed: int = 0,
                  confidence: float = 0.95) -> dict:
    """Percentile bootstrap interval of Kendall τ-b, resampling pairs (structures) with replacement.

    The resamples are the rows of ``np.random.default_rng(seed).integers(0, n, (resamples, n))``;
    the interval is the ``(1 ± confidence)/2`` percentiles (numpy's default, linear) of the τ of
    the resamples where τ is defined. Returns ``low``, ``high`` (None if no resample has a
    defined τ) and ``undefined``: resamples with a constant side, left out.
    (This could move to :mod:`autoprune.stats` beside the other intervals.)
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    index = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    taus = _taus(x, y, index)
    defined = taus[~np.isnan(taus)]
    if not len(defined):
        return {"low": None, "high": None, "undefined": int(resamples)}
    alpha = 100 * (1 - confidence) / 2
    low, high = np.percentile(defined, [alpha, 100 - alpha])
    return {"low": float(low), "high": float(high), "undefined": int(resamples - len(defined))}


def best_of_k(score: Sequence[float], final: Sequence[float], k: int) -> float:
    """The expected ``final`` of the item with the highest ``score`` among ``k`` of the items drawn
    uniformly without replacement, ties in ``score`` broken uniformly at random (exact, no sampling).

    With the items sorted by ``score`` (highest first), the one at position ``j`` (0-based) is the
    highest of the draw with probability C(n−1−j, k−1)/C(n, k). A group of tied scores is the
    highest with the sum of its positions' probabilities, whatever their order, and then each of
    its members is equally likely to be picked: so the group contributes that sum times its mean
    ``final``. ``best_of_k(final, final, k)`` is the best of ``k`` by final accuracy itself; any
    ``k = 1`` gives the mean.
    """
    score, final = np.asarray(score, float), np.asarray(final, float)
    n = len(score)
    if not 1 <= k <= n:
        raise OptionError(f"k must be from 1 to the {n} items, got {short(k)}")
    order = np.argsort(-score, kind="stable")
    score, final = score[order], final[order]
    chance = [k / n]  # C(n−1, k−1)/C(n, k); each next one × (n−j−k)/(n−1−j): O(n), no big integers
    for j in range(n - 1):
        chance.append(chance[-1] * max(0, n - j - k) / (n - 1 - j))
    expected, start = 0.0, 0
    while start < n:
        end = start + 1
        while end < n and score[end] == score[start]:
            end += 1
        expected += sum(chance[start:end]) * float(final[start:end].mean())
        start = end
    return expected


def tau_rows(candidates: Mapping[str, Sequence[Mapping]], names: Sequence[str], resamples: int = 2000,
             seed: int = 0, confidence: float = 0.95, pick: int = DEFAULT_PICK) -> list[dict]:
    """One row per budget and proxy name: τ-b between the proxy's scores (``row["proxy"][name]``)
    and ``row["final"]`` over the budget's candidate rows, its bootstrap interval, ``n``, the
    tied proxy pairs (``ties``) and tied final accuracies (``ties_final``); and with ``k`` =
    min(``pick``, n), :func:`best_of_k`'s expected final accuracy of the proxy-best of ``k``
    (``best_of_k``), of an unranked pick (``unranked``, the mean) and of the best of ``k`` by
    final accuracy (``oracle_of_k``)."""
    rows = []
    for budget, cands in candidates.items():
        final = [c["final"] for c in cands]
        k = min(pick, len(cands))
        unranked, oracle = float(np.mean(final)), best_of_k(final, final, k)
        for name in names:
            proxy = [c["proxy"][name] for c in cands]
            interval = bootstrap_tau(proxy, final, resamples, seed, confidence)
            rows.append({"budget": budget, "proxy": name, "tau": kendall_tau(proxy, final),
                         "ci_low": interval["low"], "ci_high": interval["high"],
                         "bootstrap_undefined": interval["undefined"], "n": len(cands),
                         "ties": tied_pairs(proxy), "ties_final": tied_pairs(final),
                         "k": k, "best_of_k": best_of_k(proxy, final, k), "unranked": unranked,
                         "oracle_of_k": oracle})
    return rows


def markdown(result: Mapping) -> str:
    """The τ rows as a markdown table: budget, proxy, τ, the interval, n, tied proxy pairs, then
    the expected final accuracy (%) of the proxy-best of k, of an unranked pick and of the best
    of k by final accuracy (:func:`tau_rows`)."""
    level = f"{100 * result['confidence']:g}% CI"
    num = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    ks = {r["k"] for r in result["tau"]}
    k = ks.pop() if len(ks) == 1 else "k"
    lines = [f"| budget | proxy | Kendall τ | {level} | n | ties | best of {k} by proxy, % | unranked, % "
             f"| best of {k}, % |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["tau"]:
        lines.append(f"| {r['budget']} | {r['proxy']} | {num(r['tau'])} | [{num(r['ci_low'])}, "
                     f"{num(r['ci_high'])}] | {r['n']} | {r['ties']} | {100 * r['best_of_k']:.2f} "
                     f"| {100 * r['unranked']:.2f} | {100 * r['oracle_of_k']:.2f} |")
    return "\n".join(lines) + "\n"


def write_fidelity(out: str | Path, result: Mapping) -> None:
    """``fidelity.md`` (:func:`markdown`) and ``fidelity.json`` (the whole result) in ``out``, each
    atomically; the JSON last, so that it marks a finished study (a rerun with the same settings reuses it);
    then the study's progress record, which fidelity.json supersedes, is removed."""
    from .checkpoint import atomic_write_text, write_json
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "fidelity.md", markdown(result))
    write_json(out / "fidelity.json", result)
    (out / PROGRESS_FILE).unlink(missing_ok=True)  # fidelity.json now holds every row


# --------------------------------------------------------------------------- the proxies of a space


def proxies(spec: SearchSpace) -> list[dict]:
    """The proxy fine-tuning lengths ``spec`` offers: ``name``, ``steps`` and ``total``.

    Each ``proxy.finetune_steps`` value (an int, or a list of choices) is one length; with
    ``asha`` every rung (:func:`autoprune.search.trial.rungs`) is one too, scored as the search
    scores it: at that step of the ``total``-step run. 0 steps is adaptive BN alone
    (:data:`BN_ONLY`, always measured), so it is not listed here.
    """
    from .search.trial import rungs

    steps = spec.proxy.finetune_steps
    out = {}
    for total in sorted({int(s) for s in (steps if isinstance(steps, (list, tuple)) else [steps])}):
        for step in (rungs(spec.asha, total) if spec.asha else [total]):
            if step > 0:
                name = f"finetune_{step}" if step == total else f"finetune_{step}_of_{total}"
                out[name] = {"name": name, "steps": step, "total": total}
    return list(out.values())


# --------------------------------------------------------------------------- options


def _integer(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise OptionError(f"{name} must be an integer from {low} to {high:,}, got {short(value)}")
    return value


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_options(n: int = DEFAULT_N, budgets: "Sequence[str | Budget] | None" = None,
                  space: "str | SearchSpace" = "generic", finetune_epochs: int = 5, seed: int = 0,
                  calib_images: int = 512, bn_batches: int = 50, lr: float = 0.01,
                  resamples: int = 2000, confidence: float = 0.95,
                  pick: int = DEFAULT_PICK) -> tuple[SearchSpace, list[Budget]]:
    """The loaded search space and the parsed budgets, after checking every option (OptionError,
    BudgetError or SearchSpaceError naming the option and what is allowed). Cheap, so the CLI
    runs it before any training."""
    from .search import load

    _integer(n, "n (structures per budget)", 3, MAX_N)
    _integer(finetune_epochs, "finetune_epochs", 0, 1_000_000)
    _integer(seed, "seed", 0, 2**32 - 1)
    _integer(calib_images, "calib_images", 1, 10_000_000)
    _integer(bn_batches, "bn_batches", 0, 1_000_000)
    _integer(resamples, "resamples (bootstrap)", 1, MAX_RESAMPLES)
    _integer(pick, "pick (structures the proxy picks from; capped at n)", 1, sys.maxsize)
    if not _number(lr) or not 0 < lr <= 100:
        raise OptionError(f"lr must be a number in (0, 100], got {short(lr)}")
    if not _number(confidence) or not 0 < confidence < 1:
        raise OptionError(f"confidence must be a number in (0, 1), e.g. 0.95, got {short(confidence)}")
    if budgets is None or isinstance(budgets, (str, Budget)) or not len(budgets):
        raise OptionError(f"budgets must be a non-empty list such as ['flops<=70%', 'flops<=50%'], "
                          f"got {short(budgets)}")
    parsed = [Budget.parse(b) for b in budgets]
    if len({str(b) for b in parsed}) != len(parsed):
        raise OptionError(f"budgets must be distinct, got {short([str(b) for b in parsed])}")
    spec = space if isinstance(space, SearchSpace) else load(space)
    return spec, parsed


# --------------------------------------------------------------------------- measurement


def proxy_fidelity(model: nn.Module, data: DataBundle, budget: "str | Budget | None" = None, n: int = DEFAULT_N,
                   space: "str | SearchSpace" = "generic", finetune_epochs: int = 5, seed: int = 0,
                   calib_images: int = 512, progress: bool = False, *,
                   budgets: "Sequence[str | Budget] | None" = None, bn_batches: int = 50, lr: float = 0.01,
                   resamples: int = 2000, confidence: float = 0.95, device=None,
                   out: "str | Path | None" = None, pick: int = DEFAULT_PICK) -> dict:
    """Kendall τ between the search's proxy scores and accuracy after the full fine-tune.

    ``budgets`` (or one ``budget``; default ``flops<=50%``): every budget is measured on the
    same ``n`` structures, drawn once from ``space`` with Optuna's RandomSampler(``seed``) and
    fitted to each budget as the search fits them. Each structure is scored by every proxy —
    ``adaptive_bn`` (adaptive BN on ``bn_batches`` training batches, then accuracy on the
    space's ``proxy.eval_batches`` validation batches) and each length of :func:`proxies`
    (adaptive BN, then that many SGD steps at ``proxy.lr``) — and by the runs' recipe as
    :func:`autoprune.prune` applies it: adaptive BN on ``bn_batches`` batches (default 50, as
    the runs), ``finetune_epochs`` at ``lr``, test accuracy (``final``). So that the proxy sees
    the same BN statistics as the runs, ``bn_batches`` replaces the space's ``proxy.bn_batches``.

    Returns a JSON-ready dict: the options, ``settings`` (everything the rows depend on:
    :func:`autoprune.fidelity_progress.study_settings`), ``proxies`` (names and steps), ``candidates``
    (budget → one row per structure: ``config``, ``flops``, ``params``, ``proxy`` (name →
    score), ``accuracy_adaptive_bn``, ``final``) and ``tau`` (:func:`tau_rows`: one row per
    budget and proxy with τ, its ``confidence`` bootstrap interval over ``resamples``
    resamples, ``n``, the tied proxy pairs, and :func:`best_of_k` with ``k`` = min(``pick``, ``n``):
    what picking the proxy-best of ``pick`` structures, as a search of ``pick`` trials does, buys).

    With ``out`` the study can be interrupted: each finished structure is kept in
    ``out/fidelity-progress.json`` and a rerun with the same settings measures only the rest
    (:mod:`autoprune.fidelity_progress`); :func:`write_fidelity` removes that file. A finished
    study there (``out/fidelity.json``) with the same settings is reused whole: nothing is
    calibrated or measured, and the rows are recomputed with this call's ``resamples``,
    ``confidence`` and ``pick``; one with other settings (another baseline, say) is measured again.
    """
    import torch

    from .space import Space

    if budget is not None and budgets is not None:
        raise OptionError("give budget= or budgets=, not both")
    budgets = [budget if budget is not None else "flops<=50%"] if budgets is None else budgets
    spec, budgets = check_options(n, budgets, space, finetune_epochs, seed, calib_images, bn_batches, lr,
                                  resamples, confidence, pick)
    device = torch.device(device) if device is not None else evaluate.default_device()
    model = model.to(device).eval()
    probe = Space(model, torch.zeros(1, *data.input_shape, device=device))
    for b in budgets:  # every budget reachable, before calibration
        b.target(probe)
    lengths = proxies(spec)
    names = [BN_ONLY, *(p["name"] for p in lengths)]
    kept = Progress(out, study_settings(model, data, spec, budgets, n=n, seed=seed, finetune_epochs=finetune_epochs,
                                        lr=lr, bn_batches=bn_batches, calib_images=calib_images), names)
    proxy = Section({**spec.proxy, "bn_batches": bn_batches})
    candidates = {str(b): kept.done(str(b)) for b in budgets}
    if not kept.finished:
        _measure(model, data, spec, budgets, n, seed, calib_images, bn_batches, finetune_epochs, lr, lengths, names,
                 proxy, kept, candidates, progress, device)
    return {"space": spec.name, "n": n, "seed": seed, "budgets": [str(b) for b in budgets],
            "finetune_epochs": finetune_epochs, "lr": lr, "bn_batches": bn_batches,
            "calib_images": calib_images, "proxy": dict(proxy), "asha": dict(spec.asha) if spec.asha else None,
            "proxies": [{"name": BN_ONLY, "steps": 0, "total": 0}, *lengths],
            "resamples": resamples, "confidence": confidence, "pick": pick, "settings": kept.settings,
            "candidates": candidates, "tau": tau_rows(candidates, names, resamples, seed, confidence, pick)}


def _measure(model: nn.Module, data: DataBundle, spec: SearchSpace, budgets: Sequence[Budget], n: int, seed: int,
             calib_images: int, bn_batches: int, finetune_epochs: int, lr: float, lengths: Sequence[dict],
             names: Sequence[str], proxy: Section, kept: Progress, candidates: dict, progress: bool, device) -> None:
    """Draw the ``n`` structures, then measure every one ``kept`` lacks at every budget into
    ``candidates`` (budget → rows), keeping each finished row (:func:`proxy_fidelity`)."""
    import optuna
    import torch

    from .search.runner import driver_state
    from .search.trial import PENALTY, Shared, build_structure, evaluate_candidate

    units, scores, labels = driver_state(model, data, spec, budgets[0], seed, calib_images, progress, device)

    def shared_for(b: Budget, steps: int, asha) -> Shared:
        proxy_spec = replace(spec, proxy=Section({**proxy, "finetune_steps": steps}), asha=asha)
        return Shared(model, units, proxy_spec, b, scores, labels, data, seed)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define, configs = spec.define(units), []
    for _ in range(n):
        trial = study.ask()
        define(trial)
        configs.append(dict(trial.params))

    kept.match(configs)
    for b in budgets:
        rows = candidates[str(b)] = kept.done(str(b))
        for i, config in list(enumerate(configs))[len(rows):]:
            if progress:
                print(f"fidelity {b}: structure {i + 1}/{n}", file=sys.stderr)
            torch.manual_seed(seed)  # each structure from the same RNG state, resumed or not (augmentation)
            shared = shared_for(b, 0, None)
            _, small, _, flops, nparams = build_structure(shared, spec.candidate(config, units))
            small.to(device)
            evaluate.adaptive_bn(small, data.train, n_batches=bn_batches, seed=seed, device=device)
            after_bn = evaluate.accuracy(small, data.test, device=device)
            if finetune_epochs:
                evaluate.finetune(small, data, finetune_epochs, lr=lr, seed=seed, progress=progress,
                                  device=device)
            scored = {BN_ONLY: evaluate_candidate(shared, config, device=device)["proxy_score"]}
            for total in sorted({p["total"] for p in lengths}):
                at = {p["steps"]: p["name"] for p in lengths if p["total"] == total}
                got = dict.fromkeys(at.values(), PENALTY)  # a rung after divergence scores the penalty

                def keep(metrics: dict, at=at, got=got) -> None:
                    if not metrics["diverged"] and metrics["proxy_steps"] in at:
                        got[at[metrics["proxy_steps"]]] = metrics["proxy_score"]
                evaluate_candidate(shared_for(b, total, spec.asha), config, report=keep, device=device)
                scored.update(got)
            rows.append({"candidate": i, "config": config, "flops": flops, "params": nparams,
                         "proxy": scored, "accuracy_adaptive_bn": after_bn,
                         "final": evaluate.accuracy(small.eval(), data.test, device=device)})
            kept.add(str(b), rows[-1])
