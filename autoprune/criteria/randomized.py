"""Random scores: the control every criterion should beat. Seeded per unit name.

One score per channel of the unit, read from no layer, so a coupled unit has nothing
to reduce over its members.
"""

from __future__ import annotations

import zlib

import torch

from .base import Criterion


class Random(Criterion):
    """Uniform random scores; ``seed`` (default 0) makes them repeatable."""

    name = "random"

    def score(self, space, stats):
        seed = int(self.params.get("seed", 0))
        out = {}
        for unit in space.units:
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(unit.name.encode()))
            out[unit.name] = torch.rand(unit.width, generator=g)
        return out
