"""DI greedy budget optimizer, as the authors run it (Hou & Kung 2020; METHODS.md §1).

Start from the full network. Every iteration, each unit less than ``cap`` (90%) pruned
proposes removing its lowest-ranked channels worth about ``step`` of the base FLOPs (never
below the cap); one proposal is committed, until the budget is met. Mode ``accuracy`` (the
authors' choice, :func:`autoprune.prune`'s default) commits the proposal whose masked
network scores the highest validation accuracy without fine-tuning (after adaptive BN when
the evaluator has training batches; ties: the cheaper by the criterion rule). Mode
``criterion`` (cheap) commits the least lost per FLOP saved: with DI summaries (``di=``),
the DI actually lost, ``DI(kept now) − DI(kept after)`` of the unit's scatter matrices, on
DI's one dimensionless scale for every unit; otherwise the criterion score lost (the sum of
the removed channels' scores), which compares units only as far as their scores share a
scale. Every ``rescore_every`` steps the ``rescorer`` re-ranks each unit's still-kept
channels on the current masked network (the authors: every iteration; removed channels
stay removed); every ``finetune_every`` steps ``finetune`` trains the working copy briefly
with the committed masks held (the authors: one epoch per two iterations).

The channels a unit keeps at a width are always :func:`autoprune.plan.kept_channels` of the
current ranking (with the cluster labels, if any); a re-ranking keeps every removed channel
below every kept one, so at the current widths the ranking keeps exactly the committed
channels. :attr:`GreedyResult.scores` is the final ranking: ``select(space, widths,
scores=result.scores, clusters=...)`` is the Plan whose channels the last step evaluated.
Candidates are evaluated with channel masks (:mod:`autoprune.greedy_masks`), equal to
physical removal.

The cap's edge (a decision; the authors' code simply stops proposing): when no unit can
propose within the cap and the budget is not met yet, the cap is lifted for the rest of
the walk (down to each unit's ``min_width``), recorded as ``cap_lifted_at`` (the step) in
the info and ``cap_lifted`` in every later trajectory entry. So no unit ends below
``1 − cap`` of its width unless the budget cannot be met otherwise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import Budget, fill_widths
from .errors import OptionError, short
from .greedy_masks import MaskedEvaluator, channel_masks
from .greedy_rescore import DIScatter, Rescorer
from .plan import kept_channels
from .space import Space, Unit

MODES = ("criterion", "accuracy")
"""How a candidate step is ranked: loss per FLOP saved, or validation accuracy."""

SCREEN_BATCHES = 1
"""Validation batches every candidate is screened on when the greedy screens (``screen``)."""

DEFAULT_CAP = 0.9
"""A unit at least this much pruned proposes nothing (the authors' 90% per-layer cap)."""

RULES = {
    "accuracy": "highest validation accuracy of the masked network (after adaptive BN if given)",
    "di_lost_per_flop": "least DI actually lost (DI of the unit's remaining channels before minus after, "
                        "from its scatter summaries) per FLOP saved",
    "score_lost_per_flop": "least criterion score lost (sum of the removed channels' scores; not the DI "
                           "lost: the criterion is not pure DI, or no DI summaries were given) per FLOP saved",
}
"""What each rule commits, in words (the info names the rule as ``id: words``)."""


@dataclass(frozen=True)
class FineTune:
    """Every ``every`` committed steps, ``train(model, round)`` trains the working copy with
    the committed masks held (``steps``: what one round trains, for the record)."""

    every: int
    steps: int
    train: Callable[[nn.Module, int], object]


@dataclass
class GreedyResult:
    """Final widths, the step-by-step trajectory (for the report), how they were chosen
    (``info``) and the final channel ranking ``scores`` (unit → float64 tensor [width])."""

    widths: dict[str, int]
    trajectory: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


def floor_width(unit: Unit, cap: float) -> int:
    """The fewest channels ``unit`` may keep under ``cap``: the smallest reachable width of
    at least ``(1 − cap)·width`` (``min_width`` when ``cap`` is 1)."""
    need = (1.0 - cap) * unit.width
    width = unit.round(need)
    while width < need - 1e-9 or not unit.allowed(width):
        width += 1
    return min(width, unit.width)


class _State:
    """Current widths, ranking and cost during the greedy walk; which channels a unit keeps at
    a width is :func:`~autoprune.plan.kept_channels` of its ranking (with ``clusters``)."""

    def __init__(self, space: Space, scores: Mapping[str, torch.Tensor], kind: str,
                 clusters: Mapping[str, np.ndarray] | None = None, cap: float = DEFAULT_CAP) -> None:
        self.space, self.kind = space, kind
        self.widths = space.full_widths()
        self.scores = {u.name: np.asarray(torch.as_tensor(scores[u.name]).double().cpu()) for u in space.units}
        self.clusters = dict(clusters or {})
        self.floors = {u.name: floor_width(u, cap) for u in space.units}
        self._kept: dict[tuple[str, int], list[int]] = {}

    @property
    def capped(self) -> bool:
        """Whether some unit's floor is still above its ``min_width``."""
        return any(self.floors[u.name] > u.min_width for u in self.space.units)

    def lift_cap(self) -> None:
        self.floors = self.space.min_widths()

    def cost(self, widths: Mapping[str, int] | None = None) -> int:
        return getattr(self.space.cost(widths or self.widths), self.kind)

    def kept(self, unit: Unit, width: int) -> list[int]:
        key = (unit.name, width)
        if key not in self._kept:
            self._kept[key] = kept_channels(unit, self.scores[unit.name], width, self.clusters.get(unit.name))
        return self._kept[key]

    def lost(self, unit: Unit, width: int, di: DIScatter | None = None) -> float:
        """What cutting ``unit`` to ``width`` loses: the DI lost with ``di``, else the score lost
        (the ranking's scores of the channels kept now minus of those kept at ``width``)."""
        before, after = self.kept(unit, self.widths[unit.name]), self.kept(unit, width)
        if di is not None:
            return di.lost(unit.name, before, after)
        s = self.scores[unit.name]
        return float(s[before].sum() - s[after].sum())

    def candidate(self, unit: Unit, want: float) -> dict[str, int] | None:
        """Widths with ``unit`` cut by steps until ``want`` is saved (less if it reaches its
        floor); None if it is at its floor already."""
        now, widths = self.cost(), dict(self.widths)
        floor = self.floors[unit.name]
        while True:
            width = unit.round(widths[unit.name] - 1)
            if width >= widths[unit.name] or width < floor:
                break
            widths[unit.name] = width
            if now - self.cost(widths) >= want:
                break
        return None if widths[unit.name] == self.widths[unit.name] else widths

    def masks(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        """Per cut unit, a 0/1 mask that keeps exactly the channels ``select`` keeps."""
        out = {}
        for unit in self.space.units:
            if widths[unit.name] < unit.width:
                m = torch.zeros(unit.width)
                m[self.kept(unit, widths[unit.name])] = 1
                out[unit.name] = m
        return out

    def rerank(self, name: str, kept_scores: np.ndarray) -> None:
        """Rank unit ``name``'s kept channels by ``kept_scores`` (in kept order); its removed
        channels stay below every kept one, in their previous order."""
        unit = self.space.unit(name)
        kept = np.asarray(self.kept(unit, self.widths[name]), dtype=int)
        old, new = self.scores[name], np.empty(unit.width)
        new[kept] = np.asarray(kept_scores, dtype=float)
        removed = np.setdiff1d(np.arange(unit.width), kept)
        if len(removed):  # ascending previous rank (ties: kept_channels prefers the lower index)
            order = removed[np.lexsort((-removed, old[removed]))]
            new[order] = float(new[kept].min()) - np.arange(len(order), 0, -1)
        self.scores[name] = new
        self._kept = {k: v for k, v in self._kept.items() if k[0] != name}


def _rule(mode: str, di: DIScatter | None) -> str:
    cheap = "di_lost_per_flop" if di is not None else "score_lost_per_flop"
    return "accuracy" if mode == "accuracy" else cheap


def greedy_widths(space: Space, scores: Mapping[str, torch.Tensor], budget: "str | Budget",
                  step: float = 0.005, mode: str = "criterion",
                  evaluator: MaskedEvaluator | None = None, recalibrate_every: int = 0,
                  progress: bool = True, clusters: Mapping[str, np.ndarray] | None = None, *,
                  cap: float = DEFAULT_CAP, di: DIScatter | None = None, rescorer: Rescorer | None = None,
                  rescore_every: int = 0, finetune: FineTune | None = None,
                  screen: int = 0) -> GreedyResult:
    """Widths meeting ``budget`` chosen greedily, one committed step at a time (module doc).

    ``scores`` (unit → [width]) are the initial ranking; ``clusters`` (unit → labels) the
    labels the final Plan will be selected with. ``evaluator`` scores masked structures
    (required by mode ``accuracy``, fine-tuning and ``recalibrate_every``; with one, every
    committed step's accuracy is recorded). ``di`` enables the DI-lost rule (and the
    accuracy mode's tie-break); ``rescorer`` re-ranks every ``rescore_every`` steps (0:
    never), ``finetune`` trains the evaluator's working copy every ``finetune.every`` steps.
    ``screen`` (accuracy mode; 0: off, the authors') scores every candidate on the first
    :data:`SCREEN_BATCHES` validation batches and only the best ``screen`` on all of them.
    """
    if mode not in MODES:
        raise OptionError(f"unknown greedy mode {short(mode)}; choose one of {', '.join(MODES)}")
    if evaluator is None and (mode == "accuracy" or finetune is not None or recalibrate_every):
        raise OptionError("greedy mode 'accuracy', fine-tuning and BN recalibration need an evaluator "
                          "(model + validation data); pass evaluator= or use mode 'criterion' alone")
    if rescore_every and rescorer is None:
        raise OptionError(f"rescore_every={short(rescore_every)} needs a rescorer (model + calibration "
                          "data); pass rescorer= or rescore_every=0")
    if isinstance(screen, bool) or not isinstance(screen, int) or screen < 0:
        raise OptionError(f"greedy screen must be an integer >= 0 (finalists scored on the whole validation "
                          f"subset; 0: every candidate), got {short(screen)}")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap <= 1:
        raise OptionError(f"greedy cap must be a fraction in (0, 1] (a unit at least that much pruned "
                          f"proposes nothing; 0.9 = the authors'), got {short(cap)}")
    start = time.perf_counter()
    budget = Budget.parse(budget)
    target = budget.target(space)
    state = _State(space, scores, budget.kind, clusters, cap)
    base = state.cost()
    rule = _rule(mode, di)
    settings = {"mode": mode, "rule": rule, "step": step, "cap": cap, "rescore_every": rescore_every,
                "screen": screen if mode == "accuracy" else 0,
                "recalibrate_every": recalibrate_every,
                "finetune_every": finetune.every if finetune else 0, "finetune_steps": finetune.steps if finetune else 0}
    named = {k: v for k, v in settings.items() if k not in ("step", "recalibrate_every")}  # in every entry
    evaluations = evaluator.evaluations if evaluator is not None else 0
    trajectory: list[dict] = []
    scored_at, rescores, finetunes, cap_lifted_at = 0, 0, 0, None
    bar = tqdm(total=base - target, desc="greedy", unit=budget.kind, disable=not progress, leave=False)
    while state.cost() > target:
        want = min(step * base, state.cost() - target)
        best = _best_step(state, want, mode, evaluator, di, screen)
        if best is None:
            if state.capped:  # the budget cannot be met within the cap: lift it (module doc)
                state.lift_cap()
                cap_lifted_at = len(trajectory) + 1
                continue
            break
        unit, widths, proxy, per_flop, candidates, screened = best
        u = space.unit(unit)
        before = state.kept(u, state.widths[unit])
        removed = sorted(set(before) - set(state.kept(u, widths[unit])))
        saved = state.cost() - state.cost(widths)
        state.widths = widths
        bar.update(saved)
        entry = {**named, "step": len(trajectory) + 1, "cap_lifted": cap_lifted_at is not None,
                 "scored_at": scored_at, "unit": unit, "kept": widths[unit], "removed": removed,
                 budget.kind: state.cost(), "saved": saved, "lost_per_flop": per_flop, "proxy": proxy,
                 "candidates": candidates}
        if screened is not None:
            entry["screened"] = screened
        if evaluator is not None:
            entry["accuracy"] = proxy if mode == "accuracy" else evaluator(state.masks(widths))
        trajectory.append(entry)
        if state.cost() <= target:
            break  # nothing after the last step: the pipeline takes over
        n, masks = len(trajectory), state.masks(state.widths)
        if finetune is not None and n % finetune.every == 0:
            evaluator.finetune(masks, lambda m, r=finetunes: finetune.train(m, r))
            finetunes += 1
            entry["finetuned"] = True
        if recalibrate_every and n % recalibrate_every == 0:
            evaluator.recalibrate(masks)
        if rescore_every and n % rescore_every == 0:
            fresh = rescorer(masks, {x.name: state.kept(x, state.widths[x.name]) for x in space.units})
            for name, kept_scores in fresh.scores.items():
                state.rerank(name, kept_scores)
            di = fresh.di if di is not None and fresh.di is not None else di
            scored_at, rescores = n, rescores + 1
    bar.close()
    wanted = np.array([state.widths[u.name] for u in space.units], dtype=float)
    widths = fill_widths(space, state.widths, wanted, budget.kind, target)
    info = {**settings, "rule": f"{rule}: {RULES[rule]}", "clusters": clusters is not None,
            "steps": len(trajectory), "rescores": rescores, "finetunes": finetunes, "cap_lifted_at": cap_lifted_at,
            "proxy_evaluations": (evaluator.evaluations - evaluations) if evaluator is not None else 0,
            "wall_s": round(time.perf_counter() - start, 3)}
    if mode == "accuracy":
        info["tie_break"] = _rule("criterion", di)
    ranking = {name: torch.from_numpy(s.copy()) for name, s in state.scores.items()}
    return GreedyResult(widths, trajectory, info, ranking)


def _best_step(state: _State, want: float, mode: str, evaluator, di: DIScatter | None,
               screen: int = 0) -> tuple | None:
    """The committed candidate: (unit, widths, proxy, lost per FLOP, every candidate's proxy,
    every candidate's screening accuracy or None).

    ``proxy`` is the accuracy (mode ``accuracy``) or the lost per FLOP saved (``criterion``).
    With ``screen`` (accuracy mode), more candidates than that and more validation batches
    than :data:`SCREEN_BATCHES` (else screening saves nothing), every candidate is first scored
    on the first :data:`SCREEN_BATCHES` batches and only the best ``screen`` (ties: the
    cheaper by the criterion rule) on all of them."""
    now = state.cost()
    candidates = []
    for unit in state.space.units:
        widths = state.candidate(unit, want)
        if widths is not None:
            per_flop = state.lost(unit, widths[unit.name], di) / max(now - state.cost(widths), 1)
            candidates.append((unit.name, widths, per_flop))
    if not candidates:
        return None
    screened = None
    base = state.masks(state.widths) if mode == "accuracy" else {}

    def accuracies(chosen: list, batches: int | None = None) -> dict[str, float]:
        scores = evaluator.many(base, [(name, state.masks(w)) for name, w, _ in chosen], batches)
        return {c[0]: score for c, score in zip(chosen, scores)}

    if mode == "accuracy" and screen and len(candidates) > screen and evaluator.n_batches > SCREEN_BATCHES:
        screened = accuracies(candidates, SCREEN_BATCHES)
        best = {c[0] for c in sorted(candidates, key=lambda c: (-screened[c[0]], c[2]))[:screen]}
        candidates = [c for c in candidates if c[0] in best]  # in unit order, for the tie-break below
    proxies = accuracies(candidates) if mode == "accuracy" else {name: pf for name, _, pf in candidates}
    key = (lambda c: (-proxies[c[0]], c[2])) if mode == "accuracy" else (lambda c: (c[2],))
    name, widths, per_flop = min(candidates, key=key)  # the first in unit order among equals
    return name, widths, proxies[name], per_flop, proxies, screened


__all__ = ["DEFAULT_CAP", "FineTune", "GreedyResult", "MODES", "MaskedEvaluator", "RULES", "SCREEN_BATCHES", "channel_masks",
           "floor_width", "greedy_widths"]
