"""DI-style greedy budget optimizer (Hou & Kung 2020; METHODS.md §1).

Start from the full network; at every step each unit proposes removing its
lowest-scored channels worth about a fixed share of the base FLOPs (default 0.5%);
the proposal that costs least is committed, until the budget is met. Step cost is
either ``criterion`` (share of the unit's *remaining* score lost per FLOP saved, so
each further cut of a shrinking unit costs more — fast) or
``accuracy`` (validation accuracy without fine-tuning, after adaptive BN when the
evaluator has training batches — the authors' choice). Candidates are evaluated
with channel masks on the unit's norm outputs, which in eval mode computes exactly
what the physically pruned network computes, so no candidate is ever materialised.
With an evaluator, every committed step's validation accuracy is recorded in the
trajectory (in either mode), and ``recalibrate_every`` re-estimates BN statistics
under the committed masks every few steps.
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
from .space import Space, Unit

MODES = ("criterion", "accuracy")
"""How a candidate step is ranked: criterion loss per FLOP saved, or validation accuracy."""


@dataclass
class GreedyResult:
    """Final widths and the step-by-step trajectory (for the report)."""

    widths: dict[str, int]
    trajectory: list[dict] = field(default_factory=list)


def removal_order(unit: Unit, scores: torch.Tensor) -> list[list[int]]:
    """The unit's channels in removal order, in chunks of ``unit.step`` (weakest first).

    Grouped units remove the same local index in every group, by mean local score.
    """
    s = np.asarray(torch.as_tensor(scores).double().cpu())
    size = unit.width // unit.groups
    local = s.reshape(unit.groups, size).mean(0)
    order = np.lexsort((np.arange(size), local))
    channels = [[g * size + int(i) for g in range(unit.groups)] for i in order]
    per_chunk = unit.step // unit.groups
    return [sum(channels[i:i + per_chunk], []) for i in range(0, len(channels), per_chunk)]


class _State:
    """Current widths, removed channels and the analytic cost during the greedy walk."""

    def __init__(self, space: Space, scores: Mapping[str, torch.Tensor], kind: str) -> None:
        self.space, self.kind = space, kind
        self.widths = space.full_widths()
        self.order = {u.name: removal_order(u, scores[u.name]) for u in space.units}
        self.removed = {u.name: 0 for u in space.units}
        self.share = {u.name: _shares(u, scores[u.name], self.order[u.name]) for u in space.units}

    def cost(self, widths: Mapping[str, int] | None = None) -> int:
        return getattr(self.space.cost(widths or self.widths), self.kind)

    def candidate(self, unit: Unit, want: float) -> tuple[int, dict[str, int]] | None:
        """Chunks of ``unit`` to remove to save at least ``want`` (fewer if the unit runs out)."""
        now, base = self.cost(), dict(self.widths)
        n, chunks = self.removed[unit.name], len(self.order[unit.name])
        extra = 0
        for extra in range(1, chunks - n + 1):
            kept = unit.width - sum(len(c) for c in self.order[unit.name][:n + extra])
            if kept < unit.min_width:
                extra -= 1
                break
            base[unit.name] = kept
            if now - self.cost(base) >= want:
                break
        if extra <= 0 or base[unit.name] == self.widths[unit.name]:
            return None
        return extra, base

    def masks(self, widths: Mapping[str, int]) -> dict[str, torch.Tensor]:
        out = {}
        for unit in self.space.units:
            drop = unit.width - widths[unit.name]
            if drop:
                m = torch.ones(unit.width)
                gone = sum(self.order[unit.name], [])[:drop]
                m[gone] = 0
                out[unit.name] = m
        return out


def _shares(unit: Unit, scores: torch.Tensor, order: list[list[int]]) -> np.ndarray:
    """Cumulative share of the unit's total score lost after removing each chunk."""
    s = np.asarray(torch.as_tensor(scores).double().cpu())
    s = s - min(0.0, s.min())
    total = s.sum() or 1.0
    return np.cumsum([s[c].sum() / total for c in order])


def greedy_widths(space: Space, scores: Mapping[str, torch.Tensor], budget: "str | Budget",
                  step: float = 0.005, mode: str = "criterion",
                  evaluator: "MaskedEvaluator | None" = None, recalibrate_every: int = 0,
                  progress: bool = True) -> GreedyResult:
    """Widths meeting ``budget`` chosen greedily, weakest step first (see module doc)."""
    if mode not in MODES:
        raise OptionError(f"unknown greedy mode {short(mode)}; choose one of {', '.join(MODES)}")
    if mode == "accuracy" and evaluator is None:
        raise OptionError("greedy mode 'accuracy' needs an evaluator (model + validation data); "
                             "pass evaluator= or use mode 'criterion'")
    budget = Budget.parse(budget)
    target = budget.target(space)
    state = _State(space, scores, budget.kind)
    base = state.cost()
    trajectory: list[dict] = []
    bar = tqdm(total=base - target, desc="greedy", unit=budget.kind, disable=not progress, leave=False)
    while state.cost() > target:
        want = min(step * base, state.cost() - target)
        best = _best_step(state, want, mode, evaluator)
        if best is None:
            break
        unit, extra, widths, proxy, candidates = best
        saved = state.cost() - state.cost(widths)
        state.widths, state.removed[unit] = widths, state.removed[unit] + extra
        bar.update(saved)
        entry = {"step": len(trajectory) + 1, "unit": unit, "kept": widths[unit],
                 budget.kind: state.cost(), "proxy": proxy, "candidates": candidates}
        if evaluator is not None:
            entry["accuracy"] = proxy if mode == "accuracy" else evaluator(state.masks(widths))
        trajectory.append(entry)
        if evaluator is not None and recalibrate_every and len(trajectory) % recalibrate_every == 0:
            evaluator.recalibrate(state.masks(state.widths))
    bar.close()
    wanted = np.array([state.widths[u.name] for u in space.units], dtype=float)
    widths = fill_widths(space, state.widths, wanted, budget.kind, target)
    return GreedyResult(widths, trajectory)


def _best_step(state: _State, want: float, mode: str, evaluator) -> tuple | None:
    """The cheapest candidate step: (unit, chunks, widths, proxy value, all candidates' proxies)."""
    best, proxies = None, {}
    for unit in state.space.units:
        cand = state.candidate(unit, want)
        if cand is None:
            continue
        extra, widths = cand
        if mode == "accuracy":
            proxy = evaluator(state.masks(widths))
            key = -proxy
        else:
            n = state.removed[unit.name]
            before = state.share[unit.name][n - 1] if n else 0.0
            lost = state.share[unit.name][n + extra - 1] - before
            saved = max(state.cost() - state.cost(widths), 1)
            proxy = float(lost / max(1.0 - before, 1e-12))
            key = proxy / saved
        proxies[unit.name] = proxy
        if best is None or key < best[0]:
            best = (key, unit.name, extra, widths, proxy)
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
