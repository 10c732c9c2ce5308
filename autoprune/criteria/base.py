"""The one signature every pruning criterion implements.

A criterion declares where it reads the network during calibration (``tap``),
keeps a fixed-size streaming summary per unit (``init``/``update``), and turns the
summaries into one score per channel (``score``; higher = keep). Summaries never
hold feature maps, so memory does not grow with the number of calibration images.

A unit couples several layers (a residual stream is written by a stage's first conv or
shortcut and by every block's second conv, and read by every block), so a tap has one
*member* per layer (:func:`members`): ``pre`` every writer, ``post`` every reader.
Activation criteria keep one fixed-size summary per member (a leading member axis) and
:func:`reduce_members` folds the per-member scores into the unit's score, as
Torch-Pruning reduces a group's importance over all its members, never its first layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import CriterionError, short
from ..space import Space, Unit

TAPS = ("pre", "post")
"""``pre``: the output of each root conv/linear of the unit (each writer), before its norm
layer. ``post``: the unit's channels as each consumer reads them (after activation,
pooling and residual add), one member per consumer; the unit's own output when nothing
reads it. A residual stream's first consumer reads it *before* the later blocks add to
it (ResNet: ``layer1.0.conv1`` reads the stem alone); only the later consumers see the
sums, so every reader is a member."""


def members(unit: Unit, tap: str) -> tuple[str, ...]:
    """The layers whose maps are ``unit``'s channels at ``tap``, in summary order.

    ``pre``: every root layer (``unit.modules``; the first is ``unit.name``). ``post``:
    every distinct consumer (``unit.consumers`` order), or ``(unit.name,)`` when the unit
    has none. Every writer is taken to write the unit's channels in unit order (as
    Torch-Pruning's residual and depthwise couplings do).
    """
    if tap == "pre":
        return tuple(unit.modules)
    if tap == "post":
        return tuple(dict.fromkeys(name for name, _, _ in unit.consumers)) or (unit.name,)
    raise ValueError(f"unknown tap {tap!r}; taps are {TAPS}")


def reduce_members(scores: torch.Tensor, same_scale: bool) -> torch.Tensor:
    """One score per channel [C] from per-member scores [M, C] (float64), as their mean.

    ``same_scale=True`` (scores of every member in one unit: ΔDI is dimensionless and
    invariant to a member's feature scale, ranks count, Taylor is loss, ``post`` members
    are the same stream): the plain mean over members, Torch-Pruning's default group
    reduction. ``same_scale=False`` (pre-BN map energies, whose scale the following norm
    layer discards): each member is first rescaled so that its mean over channels equals
    the mean of all members' means (an all-zero member stays zero), then averaged.
    Rescaling by the mean, not rank- or max-normalising, keeps each member's contrast
    between channels: a member whose channels all carry the same (e.g. noise) energy
    adds nearly the same to every channel and leaves the ranking to the members that
    discriminate, where ranks or a max would give its noise the full [0, 1] range.
    One member gives its scores unchanged (bit for bit).
    """
    s = scores.double()
    if s.dim() != 2 or s.shape[0] < 1:
        raise ValueError(f"reduce_members expects scores [members, channels], got {tuple(s.shape)}")
    if not same_scale and s.shape[0] > 1:
        means = s.mean(1, keepdim=True)
        target = means.mean()
        s = torch.where(means > 0, s * (target / means.clamp_min(torch.finfo(s.dtype).tiny)),
                        torch.zeros_like(s))
    return s.mean(0)


def per_image_means(sums: torch.Tensor, counts: torch.Tensor, what: str) -> torch.Tensor:
    """Per-member means ``sums / counts`` ([M, C] over [M] images) of the members that saw
    images; ValueError naming ``what`` when none did. A summary without a member axis
    (``sums`` [C], ``counts`` a scalar) is one member."""
    counts = counts.double().reshape(-1)
    seen = counts > 0
    if not bool(seen.any()):
        raise ValueError(f"{what}: no calibration image reached it")
    return sums.double().reshape(counts.numel(), -1)[seen] / counts[seen, None]


@dataclass
class Batch:
    """What calibration hands to ``update`` for one batch.

    ``maps`` and ``grads`` are keyed by (tap, unit name, member) for every member of
    :func:`members`, and by (tap, unit name) for the first member; each map is
    [N, C, ...] with C the unit's width in unit order. ``grads`` holds
    d(cross-entropy)/d(map) when a criterion asked for gradients. A reader that reads
    the very tensor an earlier reader of the unit read is left out (counted once).
    """

    maps: dict[tuple, torch.Tensor]
    grads: dict[tuple, torch.Tensor]
    labels: torch.Tensor

    def member_maps(self, tap: str, unit: Unit) -> list[tuple[int, torch.Tensor]]:
        """(member index, map) of every member of ``unit`` at ``tap`` this batch holds."""
        return self._members(self.maps, tap, unit)

    def every_member_map(self, tap: str, unit: Unit, criterion: str) -> list[torch.Tensor]:
        """The map of every member of ``unit`` at ``tap``, in member order; ValueError
        naming the missing ones (per-member summaries must all see the same images)."""
        found = self.member_maps(tap, unit)
        expected = members(unit, tap)
        if len(found) != len(expected):
            missing = sorted(set(expected) - {expected[i] for i, _ in found})
            raise ValueError(f"{criterion}: unit {unit.name}: the batch holds no {tap!r} map of {missing}")
        return [t for _, t in found]

    def member_grads(self, tap: str, unit: Unit) -> dict[int, torch.Tensor]:
        """Member index → gradient, for the members of ``unit`` at ``tap`` that have one."""
        return dict(self._members(self.grads, tap, unit))

    @staticmethod
    def _members(found: dict, tap: str, unit: Unit) -> list[tuple[int, torch.Tensor]]:
        out = []
        for i, name in enumerate(members(unit, tap)):
            t = found.get((tap, unit.name, name))
            if t is None and i == 0:  # a batch keyed by unit only (built by hand)
                t = found.get((tap, unit.name))
            if t is not None:
                out.append((i, t))
        return out


class Criterion:
    """Base class: subclass, set ``name`` (and ``tap``/``needs_grad``), implement score.

    Data-free criteria (weights only) leave ``tap = None`` and ignore ``stats``.
    """

    name: ClassVar[str]
    tap: ClassVar[str | None] = None
    needs_grad: ClassVar[bool] = False
    extra_taps: ClassVar[tuple[str, ...]] = ()
    requires: ClassVar[tuple[str, ...]] = ()
    """Params ``score`` cannot do without that calibration does not produce (fpar: its
    ``attention``); :meth:`inputs` computes them, and :func:`autoprune.prune` and the
    search pass them to ``score``."""
    settings: ClassVar[tuple[str, ...]] = ()
    """Params a user may set (``prune(criterion_params={name: {...}})``); :meth:`check`."""

    def __init__(self, **params) -> None:
        self.params = params

    def check(self) -> None:
        """CriterionError (one line) for a param that is not one of ``settings``; run on the
        user's params before any work. Subclasses with settings also check their values."""
        unknown = [k for k in self.params if k not in self.settings]
        if unknown:
            takes = f"its settings are {', '.join(self.settings)}" if self.settings else "it takes none"
            raise CriterionError(f"criterion {self.name!r} has no setting {short(unknown[0])}; {takes}")

    def inputs(self, space: Space, model, batches, *, seed: int = 0, device=None) -> dict[str, object]:
        """The ``requires`` params, computed from ``model`` on ``batches`` (re-iterable
        (images, labels): the calibration images) with ``seed`` fixing any randomness."""
        if self.requires:
            raise NotImplementedError(f"criterion {self.name!r} requires {', '.join(self.requires)}: "
                                      "override inputs() to compute them")
        return {}

    def init(self, unit: Unit, space: Space) -> dict[str, torch.Tensor]:
        """Empty streaming summary for ``unit`` (fixed size, independent of image count)."""
        return {}

    def update(self, unit: Unit, state: dict[str, torch.Tensor], batch: Batch) -> None:
        """Fold one batch into ``state`` in place."""

    def score(self, space: Space, stats: "Stats") -> dict[str, torch.Tensor]:
        """Per unit, a float tensor [width]: higher means more worth keeping."""
        raise NotImplementedError

    def taps(self) -> set[str]:
        return ({self.tap} if self.tap else set()) | set(self.extra_taps)


class Stats(dict):
    """Calibration summaries: criterion name → unit name → state dict of tensors.

    ``settings`` records what produced them (criteria params, image count, cache key).
    """

    def __init__(self, data: dict | None = None, settings: dict | None = None) -> None:
        super().__init__(data or {})
        self.settings = dict(settings or {})

    def of(self, criterion: str) -> dict[str, dict[str, torch.Tensor]]:
        """Summaries of ``criterion``; KeyError naming what calibration collected."""
        if criterion not in self:
            raise KeyError(f"stats hold no {criterion!r} summaries (collected: {sorted(self)}); "
                           f"pass it in calibrate(criteria=[...])")
        return self[criterion]

    def nbytes(self) -> int:
        """Total size of the stored summaries (for the memory-bound check)."""
        return sum(t.numel() * t.element_size() for per_unit in self.values()
                   for state in per_unit.values() for t in state.values())
