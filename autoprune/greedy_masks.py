"""The greedy's working copy: a structure held with channel masks instead of removed channels.

:func:`channel_masks` zeroes masked channels at the output of each unit's norm layers (its
root layers when it has none). In eval mode this computes exactly what the physically pruned
network computes (consumers see zeros, residual adds carry zeros, no other channel changes),
and in train mode too (BN normalises per channel), so candidates are evaluated, calibrated
and fine-tuned without ever being materialised. :class:`MaskedEvaluator` owns one copy of
the model: it scores a masked structure's validation accuracy (after adaptive BN when given
training batches), re-estimates BN statistics under the committed masks, and fine-tunes the
copy with the masks held (a masked channel's output is zero, so the loss sends no gradient
to its filter or norm parameters). :meth:`MaskedEvaluator.many` scores one step's candidates
together, replaying what none of a candidate's changes can reach from one pass of the committed
structure (:mod:`autoprune.greedy_prefix`; exact).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .greedy_prefix import ExecutionOrder, record, replay
from .space import Space

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
"""The state-dict entries adaptive BN re-estimates (saved and restored around a candidate)."""

PREFIX_CACHE_MB = 1024
"""At most this much memory (MB) holds the committed structure's recorded training-batch outputs
for prefix reuse in the adaptive-BN pass; above it that pass recomputes every candidate's
prefix (the validation pass records one batch at a time and always reuses)."""


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


def _snapshot(buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in buffers.items()}


def _load(buffers: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the live ``buffers`` in place."""
    with torch.no_grad():
        for k, v in buffers.items():
            v.copy_(state[k])


class MaskedEvaluator:
    """Validation accuracy of a masked structure, after adaptive BN if given training batches.

    Works on its own copy of ``model`` (``self.model``, the greedy's working copy), so the
    caller's model never changes. A call re-estimates BN statistics under the masks with
    ``bn_fn(model, train_batches)`` (when both are given), scores ``val_batches`` and
    restores the statistics; ``evaluations`` counts the calls. :meth:`recalibrate` keeps
    the re-estimated statistics (the greedy's "recalibrate every few steps") and
    :meth:`finetune` trains the copy with the masks held (``finetuned`` is then True).
    :meth:`many` scores several candidates of one step with prefix reuse (``reuse_prefix``;
    ``prefix`` counts the candidates it scored and how many of them replayed a prefix).
    """

    def __init__(self, model: nn.Module, space: Space, val_batches: list, train_batches: list | None = None,
                 bn_fn: Callable | None = None, reuse_prefix: bool = True) -> None:
        self.model, self.space = copy.deepcopy(model).eval(), space
        self.val_batches, self.train_batches, self.bn_fn = val_batches, train_batches, bn_fn
        self.evaluations = 0
        self.finetuned = False
        self.reuse_prefix = reuse_prefix
        self.prefix = {"candidates": 0, "reused": 0, "train_cache": True}
        self._order: ExecutionOrder | None = None

    @torch.no_grad()
    def __call__(self, masks: Mapping[str, torch.Tensor], batches: int | None = None) -> float:
        """Accuracy of the structure ``masks`` on the first ``batches`` validation batches (all
        when None), after adaptive BN when given training batches."""
        self.evaluations += 1
        if self.adapts:
            buffers = self._bn_buffers()
            saved = _snapshot(buffers)
            self.recalibrate(masks)
        correct = total = 0
        device = next(self.model.parameters()).device
        with channel_masks(self.model, self.space, masks):
            for x, y in self.val_batches[:batches]:
                correct += (self.model(x.to(device)).argmax(1).cpu() == y).sum().item()
                total += len(y)
        if self.adapts:
            _load(buffers, saved)
        return correct / max(total, 1)

    @property
    def adapts(self) -> bool:
        """Whether a candidate's BN statistics are re-estimated before it is scored."""
        return self.bn_fn is not None and bool(self.train_batches)

    def _bn_buffers(self) -> dict[str, torch.Tensor]:
        """The working copy's BN statistics (:data:`BN_STATS`), the live tensors."""
        return {k: v for k, v in self.model.state_dict(keep_vars=True).items() if k.split(".")[-1] in BN_STATS}

    @torch.no_grad()
    def many(self, base: Mapping[str, torch.Tensor], candidates: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
             batches: int | None = None) -> list[float]:
        """Each candidate's accuracy, as ``self(masks, batches)`` would score it, for
        ``candidates`` of one step: ``(unit, masks)`` where ``masks`` equal ``base`` (the
        committed structure) except for ``unit``'s. With ``reuse_prefix``, the modules that
        finish before a candidate's unit is first masked replay one recording of ``base``
        (:mod:`autoprune.greedy_prefix`); the adaptive-BN pass replays too while its recording
        fits :data:`PREFIX_CACHE_MB` (``prefix["train_cache"]`` says whether it did)."""
        if not self.reuse_prefix or len(candidates) < 2:
            return [self(masks, batches) for _, masks in candidates]
        self.evaluations += len(candidates)
        if self._order is None:
            self._order = ExecutionOrder(self.model, self.val_batches[0][0])
        plans = [self._order.clean(self.space.unit(unit)) for unit, _ in candidates]
        union = sorted(set().union(*plans))
        device = next(self.model.parameters()).device
        adapts = self.adapts
        buffers = self._bn_buffers()
        saved = _snapshot(buffers)
        if adapts:
            images = sum(len(b[0]) if isinstance(b, (tuple, list)) else len(b) for b in self.train_batches)
            train_cache = self._order.mb(union, images) <= PREFIX_CACHE_MB
            self.prefix["train_cache"] = train_cache
            with channel_masks(self.model, self.space, base), record(self.model, union if train_cache else []) as cache:
                self.bn_fn(self.model, self.train_batches)  # the committed structure's statistics
            base_state = _snapshot(buffers)
            states = []
            for (unit, masks), plan in zip(candidates, plans):
                with channel_masks(self.model, self.space, masks), replay(self.model, plan if train_cache else [], cache):
                    self.bn_fn(self.model, self.train_batches)
                states.append(_snapshot(buffers))
        self.model.eval()
        correct, total = [0] * len(candidates), 0
        for x, y in self.val_batches[:batches]:
            x = x.to(device)
            if adapts:
                _load(buffers, base_state)
            with channel_masks(self.model, self.space, base), record(self.model, union) as cache:
                self.model(x)
            for i, ((_, masks), plan) in enumerate(zip(candidates, plans)):
                if adapts:
                    _load(buffers, states[i])
                with channel_masks(self.model, self.space, masks), replay(self.model, plan, cache):
                    correct[i] += (self.model(x).argmax(1).cpu() == y).sum().item()
            total += len(y)
        _load(buffers, saved)
        self.prefix["candidates"] += len(candidates)
        self.prefix["reused"] += sum(bool(p) for p in plans)
        return [c / max(total, 1) for c in correct]

    @property
    def n_batches(self) -> int:
        """How many validation batches a full evaluation scores."""
        return len(self.val_batches)

    def recalibrate(self, masks: Mapping[str, torch.Tensor]) -> None:
        if self.bn_fn is not None and self.train_batches:
            with channel_masks(self.model, self.space, masks):
                self.bn_fn(self.model, self.train_batches)
            self.model.eval()

    def finetune(self, masks: Mapping[str, torch.Tensor], train: Callable[[nn.Module], object]) -> None:
        """``train(model)`` on the working copy with ``masks`` held, then back to eval mode.

        The masked channels' parameters get no gradient from the loss; weight decay, if
        ``train`` applies it, still shrinks them (they are removed from the final model,
        unless filling the budget at the end puts a channel back)."""
        with channel_masks(self.model, self.space, masks):
            train(self.model)
        self.model.eval()
        self.finetuned = True


__all__ = ["BN_STATS", "MaskedEvaluator", "PREFIX_CACHE_MB", "channel_masks"]
