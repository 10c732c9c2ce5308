"""The one signature every pruning criterion implements.

A criterion declares where it reads the network during calibration (``tap``),
keeps a fixed-size streaming summary per unit (``init``/``update``), and turns the
summaries into one score per channel (``score``; higher = keep). Summaries never
hold feature maps, so memory does not grow with the number of calibration images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..space import Space, Unit

TAPS = ("pre", "post")
"""``pre``: the unit's root conv/linear output, before its norm layer.
``post``: the unit's channels as the next layer reads them (after activation and
residual add) — the input of the unit's first consumer."""


@dataclass
class Batch:
    """What calibration hands to ``update`` for one batch.

    ``maps`` and ``grads`` are keyed by (tap, unit name); each map is [N, C, ...] with
    C the unit's width in unit order. ``grads`` holds d(cross-entropy)/d(map) when a
    criterion asked for gradients.
    """

    maps: dict[tuple[str, str], torch.Tensor]
    grads: dict[tuple[str, str], torch.Tensor]
    labels: torch.Tensor


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
    ``attention``); :func:`autoprune.prune` cannot compute such criteria."""

    def __init__(self, **params) -> None:
        self.params = params

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
