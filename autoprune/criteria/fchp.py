"""FCHP (IEEE TCSVT 32:6807, 2022): discriminative content and next-layer correlation.

**Reconstruction** (METHODS.md §3; no code or full text was available): a channel's
discriminative feature is the rank-k SVD reconstruction of its pre-BN H×W map, and its
score the content ``d_c = mean_i Σ_{j<k} σ_j(F[i, c])`` (k param, default 2). For
grouping ("hierarchies"), each channel gets a profile: the Pearson correlations
(flattened maps, mean over images) between its discriminative feature and every channel
of the next unit's pre-BN maps, adaptively average-pooled to this unit's H×W;
:func:`autoprune.grouping.cluster` ("fchp") runs k-means over the profiles.

The next unit is the one owning the first of this unit's consumers that is a root layer
of another unit, and its map is that consumer's own output (the next unit's ``pre`` member
for that layer: for a block whose conv writes a residual stream, the block's conv, not
the stream's first writer). A unit with no next unit gets an empty profile and falls
back to one cluster; a linear unit ([N, C] maps, 1×1) has constant maps, so its
correlations are 0.

A coupled unit (a residual stream) has several writers: the content ``d`` is kept per
writer and reduced by :func:`~autoprune.criteria.base.reduce_members`
(``same_scale=False``: singular values carry each writer's own pre-BN scale), and the
profile of a channel is the mean of its writers' correlation profiles.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Batch, Criterion, members, reduce_members
from .hpse import as_images


def svd_content(maps: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Per image and channel, the sum of the top-k singular values of each H×W map [N, C]."""
    s = torch.linalg.svdvals(as_images(maps).float())
    return s[..., :k].sum(-1)


def discriminative(maps: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank-k reconstructions [N, C, H, W], content [N, C]) of maps [N, C, H, W].

    The reconstruction projects each map onto its top-k singular vectors, found by an
    eigendecomposition of the smaller Gram matrix in float64 (same result as a full SVD,
    several times faster for many small maps on CPU); the content is the sum of the
    square roots of the same top-k eigenvalues (the top-k singular values).
    """
    x = as_images(maps).float()
    xd = x.double()
    tall = x.shape[-2] > x.shape[-1]
    gram = xd.transpose(-1, -2) @ xd if tall else xd @ xd.transpose(-1, -2)
    vals, vecs = torch.linalg.eigh(gram)  # ascending order
    top = min(k, gram.shape[-1])
    content = vals[..., -top:].clamp_min(0).sqrt().sum(-1).to(x.dtype)
    vecs = vecs[..., -top:]
    proj = vecs @ vecs.transpose(-1, -2)
    recon = xd @ proj if tall else proj @ xd
    return recon.to(x.dtype), content


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, correlations [N, Ca, Cb] between flattened maps a [N, Ca, ...] and b [N, Cb, ...].

    A constant map correlates 0 with everything.
    """
    a = a.flatten(2).double()
    b = b.flatten(2).double()
    a = a - a.mean(2, keepdim=True)
    b = b - b.mean(2, keepdim=True)
    a = a / a.norm(dim=2, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return a @ b.transpose(1, 2)


def next_reader(space, unit):
    """(next unit, layer): the first of ``unit``'s consumers that is a root layer (any of
    the ``modules``) of another unit, and that unit; None if no consumer is one."""
    owner = {}
    for other in space.units:
        if other.name != unit.name:
            for m in other.modules:
                owner.setdefault(m, other)
    for name, _, _ in unit.consumers:
        if name in owner:
            return owner[name], name
    return None


def next_unit(space, unit):
    """The unit owning the first of ``unit``'s consumers that is a root layer (any of its
    ``modules``) of another unit, or None."""
    found = next_reader(space, unit)
    return found[0] if found else None


class FCHP(Criterion):
    """Discriminative content d_c (top-k singular values); also correlation profiles.

    Params: ``k`` SVD rank (default 2). State per unit: ``d`` [W, C] summed content per
    writer, ``corr`` [C, C_next] summed (writer-mean) correlation profiles (C_next = 0
    without a next unit), ``n`` image count.
    """

    name = "fchp"
    tap = "pre"

    def __init__(self, **params) -> None:
        super().__init__(**params)
        self._next: dict[str, tuple | None] = {}

    def _rank(self) -> int:
        k = int(self.params.get("k", 2))
        if k < 1:
            raise ValueError(f"fchp: SVD rank k must be >= 1, got {k}")
        return k

    def init(self, unit, space):
        found = next_reader(space, unit)
        self._next[unit.name] = found
        return {"d": torch.zeros(len(members(unit, "pre")), unit.width, dtype=torch.double),
                "corr": torch.zeros(unit.width, found[0].width if found else 0, dtype=torch.double),
                "n": torch.zeros((), dtype=torch.double)}

    def update(self, unit, state, batch: Batch):
        found = [as_images(m) for m in batch.every_member_map("pre", unit, self.name)]
        k = self._rank()
        nxt = self._next.get(unit.name)
        if nxt is None and state["corr"].shape[1]:
            raise RuntimeError(f"fchp: update before init for unit {unit.name}")
        state["n"] += found[0].shape[0]
        if nxt is None:
            for j, maps in enumerate(found):
                state["d"][j] += svd_content(maps, k).sum(0).double().cpu()
            return
        other_unit, layer = nxt
        other = dict(batch.member_maps("pre", other_unit)).get(members(other_unit, "pre").index(layer))
        if other is None:
            raise ValueError(f"fchp: unit {unit.name}: the batch holds no 'pre' map of {layer} "
                             f"(a root of the next unit, {other_unit.name})")
        other = as_images(other).float()
        profiles = []
        for j, maps in enumerate(found):
            recon, content = discriminative(maps, k)
            state["d"][j] += content.sum(0).double().cpu()
            profiles.append(pearson(recon, F.adaptive_avg_pool2d(other, maps.shape[-2:])).sum(0))
        state["corr"] += torch.stack(profiles).mean(0).cpu()

    def score(self, space, stats):
        out = {}
        for unit in space.units:
            state = stats.of(self.name)[unit.name]
            if float(state["n"]) == 0:
                raise ValueError(f"fchp: no calibration images were seen for unit {unit.name}")
            out[unit.name] = reduce_members(state["d"] / state["n"], same_scale=False).float()
        return out
