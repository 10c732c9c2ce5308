"""DI-style greedy budget optimizer (Hou & Kung 2020; METHODS.md §1).

Start from the full network; at every step each unit proposes removing its
lowest-scored channels worth about a fixed share of the base FLOPs (default 0.5%);
the proposal that costs least is committed, until the budget is met. Step cost is
either ``criterion`` — the score actually lost, ``Σ score(kept now) − Σ score(kept after)``
(for exact per-channel ΔDI scores: the DI lost, to first order), per FLOP saved, on one
scale for every unit (a unit whose scores are 1000× larger is 1000× dearer to cut; scaling
every unit alike changes nothing) — fast; or ``accuracy`` (validation accuracy without
fine-tuning, after adaptive BN when the evaluator has training batches — the authors'
choice). The channels a unit keeps at a width are always :func:`autoprune.plan.kept_channels`
(with the cluster labels, if any): the very rule :func:`autoprune.plan.select` builds the
final Plan with, so every candidate evaluated is exactly the network the Plan would
produce at those widths. Candidates are evaluated with channel masks on the unit's norm
outputs, which in eval mode computes what the physically pruned network computes, so no
candidate is ever materialised. Every trajectory entry records the ``mode`` and its
``proxy`` (score lost, or accuracy); with an evaluator, every committed step's validation
accuracy too (in either mode), and ``recalibrate_every`` re-estimates BN statistics under
the committed masks every few steps. Scores are computed once, on the full network (the
authors re-rank on the current pruned network every iteration).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import Budget, fill_widths
from .errors import OptionError, short
from .plan import kept_channels
from .space import Space, Unit

MODES = ("criterion", "accuracy")
"""How a candidate step is ranked: score lost per FLOP saved, or validation accuracy."""

RULES = {"criterion": "least score lost (sum of the removed channels' scores) per FLOP saved",
         "accuracy": "highest validation accuracy of the masked network (after adaptive BN if given)"}
"""What each mode commits, in words (recorded in the result's ``info``)."""


@dataclass
class GreedyResult:
    """Final widths, the step-by-step trajectory (for the report) and how they were chosen."""

    widths: dict[str, int]
    trajectory: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)


class _State:
    """Current widths and the analytic cost during the greedy walk; which channels a unit
    keeps at a width is :func:`~autoprune.plan.kept_channels` (with ``clusters``)."""

    def __init__(self, space: Space, scores: Mapping[str, torch.Tensor], kind: str,
                 clusters: Mapping[str, np.ndarray] | None = None) -> None:
        self.space, self.kind = space, kind
        self.widths = space.full_widths()
        self.scores = {u.name: np.asarray(torch.as_tensor(scores[u.name]).double().cpu()) for u in space.units}
        self.clusters = dict(clusters or {})
        self._kept: dict[tuple[str, int], list[int]] = {}

    def cost(self, widths: Mapping[str, int] | None = None) -> int:
        return getattr(self.space.cost(widths or self.widths), self.kind)

    def kept(self, unit: Unit, width: int) -> list[int]:
        key = (unit.name, width)
        if key not in self._kept:
            self._kept[key] = kept_channels(unit, self.scores[unit.name], width, self.clusters.get(unit.name))
        return self._kept[key]

    def score_lost(self, unit: Unit, width: int) -> float:
        """Score of the channels ``unit`` keeps now minus of those it keeps at ``width``."""
        s = self.scores[unit.name]
        return float(s[self.kept(unit, self.widths[unit.name])].sum() - s[self.kept(unit, width)].sum())

    def candidate(self, unit: Unit, want: float) -> dict[str, int] | None:
        """Widths with ``unit`` cut by steps until ``want`` is saved (less if it runs out)."""
        now, widths = self.cost(), dict(self.widths)
        while True:
            width = unit.round(widths[unit.name] - 1)
            if width >= widths[unit.name]:
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


def greedy_widths(space: Space, scores: Mapping[str, torch.Tensor], budget: "str | Budget",
                  step: float = 0.005, mode: str = "criterion",
                  evaluator: "MaskedEvaluator | None" = None, recalibrate_every: int = 0,
                  progress: bool = True, clusters: Mapping[str, np.ndarray] | None = None) -> GreedyResult:
    """Widths meeting ``budget`` chosen greedily, cheapest step first (see module doc).

    ``clusters`` (unit → labels) are the labels the final Plan will be selected with
    (``select(..., clusters=)``): candidates keep channels per cluster exactly as it will.
    """
    if mode not in MODES:
        raise OptionError(f"unknown greedy mode {short(mode)}; choose one of {', '.join(MODES)}")
    if mode == "accuracy" and evaluator is None:
        raise OptionError("greedy mode 'accuracy' needs an evaluator (model + validation data); "
                             "pass evaluator= or use mode 'criterion'")
    budget = Budget.parse(budget)
    target = budget.target(space)
    state = _State(space, scores, budget.kind, clusters)
    base = state.cost()
    trajectory: list[dict] = []
    bar = tqdm(total=base - target, desc="greedy", unit=budget.kind, disable=not progress, leave=False)
    while state.cost() > target:
        want = min(step * base, state.cost() - target)
        best = _best_step(state, want, mode, evaluator)
        if best is None:
            break
        unit, widths, proxy, candidates = best
        saved = state.cost() - state.cost(widths)
        state.widths = widths
        bar.update(saved)
        entry = {"step": len(trajectory) + 1, "mode": mode, "unit": unit, "kept": widths[unit],
                 budget.kind: state.cost(), "proxy": proxy, "candidates": candidates}
        if evaluator is not None:
            entry["accuracy"] = proxy if mode == "accuracy" else evaluator(state.masks(widths))
        trajectory.append(entry)
        if evaluator is not None and recalibrate_every and len(trajectory) % recalibrate_every == 0:
            evaluator.recalibrate(state.masks(state.widths))
    bar.close()
    wanted = np.array([state.widths[u.name] for u in space.units], dtype=float)
    widths = fill_widths(space, state.widths, wanted, budget.kind, target)
    info = {"mode": mode, "rule": RULES[mode], "step": step, "clusters": clusters is not None}
    return GreedyResult(widths, trajectory, info)


def _best_step(state: _State, want: float, mode: str, evaluator) -> tuple | None:
    """The cheapest candidate step: (unit, widths, proxy value, all candidates' proxies)."""
    best, proxies = None, {}
    for unit in state.space.units:
        widths = state.candidate(unit, want)
        if widths is None:
            continue
        if mode == "accuracy":
            proxy = evaluator(state.masks(widths))
            key = -proxy
        else:
            proxy = state.score_lost(unit, widths[unit.name])
            key = proxy / max(state.cost() - state.cost(widths), 1)
        proxies[unit.name] = proxy
        if best is None or key < best[0]:
            best = (key, unit.name, widths, proxy)
    return None if best is None else (*best[1:], proxies)


@contextmanager
def channel_masks(model: nn.Module, space: Space, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Zero the masked channels at the output of each unit's norm layers (roots if none).

    In eval mode this equals physical removal: consumers see zeros, residual adds
    carry zeros, and no other channel's computation changes.
    """
    hooks = []
    for name, mask in masks.items():
        unit = space.unit(name)
        for layer in unit.norms or unit.modules:
            hooks.append(model.get_submodule(layer).register_forward_hook(
                lambda m, i, o, k=mask: _apply_mask(o, k)))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _apply_mask(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(out.device, out.dtype)
    if out.dim() > 1 and out.shape[1] == mask.numel():
        return out * mask.view(1, -1, *([1] * (out.dim() - 2)))
    return out * mask  # channel-last layers (e.g. LayerNorm over the last dim)


class MaskedEvaluator:
    """Validation accuracy of a masked structure, after adaptive BN if given training batches.

    Works on its own copy of ``model``, so the caller's BN statistics never change.
    A call re-estimates BN statistics under the masks with ``bn_fn(model, train_batches)``
    (when both are given), scores ``val_batches`` and restores the statistics;
    ``recalibrate`` keeps the re-estimated statistics (the greedy's optional
    "recalibrate every few steps").
    """

    def __init__(self, model: nn.Module, space: Space, val_batches: list, train_batches: list | None = None,
                 bn_fn: Callable | None = None) -> None:
        self.model, self.space = copy.deepcopy(model).eval(), space
        self.val_batches, self.train_batches, self.bn_fn = val_batches, train_batches, bn_fn

    @torch.no_grad()
    def __call__(self, masks: Mapping[str, torch.Tensor]) -> float:
        adapts = self.bn_fn is not None and bool(self.train_batches)
        if adapts:
            saved = {k: v.clone() for k, v in self.model.state_dict().items() if k.split(".")[-1] in _BN_STATS}
            self.recalibrate(masks)
        correct = total = 0
        device = next(self.model.parameters()).device
        with channel_masks(self.model, self.space, masks):
            for x, y in self.val_batches:
                correct += (self.model(x.to(device)).argmax(1).cpu() == y).sum().item()
                total += len(y)
        if adapts:
            self.model.load_state_dict(saved, strict=False)
        return correct / max(total, 1)

    def recalibrate(self, masks: Mapping[str, torch.Tensor]) -> None:
        if self.bn_fn is not None and self.train_batches:
            with channel_masks(self.model, self.space, masks):
                self.bn_fn(self.model, self.train_batches)
            self.model.eval()


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
