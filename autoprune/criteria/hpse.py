"""HPSE (IEEE T-MM 25:6958, 2023): edge energy scores, shape-overlap groups.

Each channel's pre-BN map is filtered with horizontal and vertical 2-tap kernels:
``[−1, 1]`` gives the edge (high-frequency) map ``E = sqrt(Dx² + Dy²)``, ``[1, 1]`` the
shape (low-frequency) map ``S = sqrt(Sx² + Sy²)``. A channel's score is its edge energy
``e_c = mean_i Σ_hw E[i, c]``: channels carrying detail are kept. For grouping, every
image's C shape maps are clustered (k-means, k = max(1, C // 16) by default) and the
clusters renumbered by ascending mean shape energy so that labels agree across images;
the criterion counts each channel's votes, and :func:`autoprune.grouping.cluster`
("hpse") takes the mode. Pruning the lowest-edge channels within each group at the same
rate keeps representatives of every shape (``select(..., clusters=...)``).

A coupled unit (a residual stream) has several writers, each tapped before its norm:
the edge energies are kept per writer and reduced by
:func:`~autoprune.criteria.base.reduce_members` (``same_scale=False``: each writer's
pre-BN scale is its own, so each is rescaled to the writers' common mean energy before
averaging); every writer's per-image shape clusters vote, so a channel's group is the
mode over images and writers.

'same' output size with an even kernel needs one extra column (row) after the map; it
is *replicate* padding, the border value repeated: ``Dx[h, w] = F[h, w+1] − F[h, w]``
with ``F[h, W] = F[h, W−1]``, so the last column has ``Dx = 0`` and ``Sx = 2·F``. Zero
padding (PyTorch's ``padding="same"``) would turn every map's border into a step down to
0 and add its mean level to the edge score: a constant map would score edges. With
replicate padding a constant map's edge energy is exactly 0, for both maps alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grouping import kmeans_batched
from .base import Batch, Criterion, members, reduce_members


def as_images(maps: torch.Tensor) -> torch.Tensor:
    """View unit maps [N, C, *spatial] as [N, C, H, W] (a linear unit's [N, C] is 1×1; 1-D is 1×L)."""
    if maps.dim() == 2:
        return maps[:, :, None, None]
    if maps.dim() == 3:
        return maps[:, :, None, :]
    if maps.dim() == 4:
        return maps
    raise ValueError(f"expected maps of shape [N, C], [N, C, L] or [N, C, H, W], got {tuple(maps.shape)}")


def edge_shape_maps(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge and shape maps (E, S), each [N, C, H, W], of maps [N, C, H, W] ('same' size,
    replicate padded: the last column/row repeats, so a constant map has no edges)."""
    x = as_images(maps).float()
    right = torch.cat([x[..., :, 1:], x[..., :, -1:]], dim=-1)   # F[h, w+1], F[h, W-1] past the border
    below = torch.cat([x[..., 1:, :], x[..., -1:, :]], dim=-2)   # F[h+1, w], F[H-1, w] past the border
    edge = torch.sqrt((right - x) ** 2 + (below - x) ** 2)
    shape = torch.sqrt((right + x) ** 2 + (below + x) ** 2)
    return edge, shape


def edge_scores(maps: torch.Tensor) -> torch.Tensor:
    """Per image and channel, the edge energy Σ_hw E [N, C]."""
    return edge_shape_maps(maps)[0].sum((2, 3))


def shape_labels(shape: torch.Tensor, k: int, seed: int = 0, iters: int = 20) -> torch.Tensor:
    """Per image, k-means labels [N, C] of the flattened shape maps [N, C, H, W], clusters
    renumbered by ascending mean shape energy (ties: lower original label first)."""
    n_img, c = shape.shape[:2]
    labels, _ = kmeans_batched(shape.flatten(2), k, seed=seed, iters=iters)
    k = max(1, min(k, c))
    energy = shape.flatten(2).mean(2)  # [N, C]
    total = torch.zeros(n_img, k, dtype=energy.dtype, device=energy.device).scatter_add_(1, labels, energy)
    count = torch.zeros_like(total).scatter_add_(1, labels, torch.ones_like(energy))
    order = torch.argsort(total / count.clamp_min(1), dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(k, device=order.device).expand(n_img, k))
    return rank.gather(1, labels)


class HPSE(Criterion):
    """Edge energy of the pre-BN maps; also collects per-image shape-cluster votes.

    Params: ``k`` clusters per image (default max(1, width // 16), capped at the width),
    ``iters`` k-means iterations (default 20), ``seed`` (default 0).
    State per unit: ``edge`` [W, C] summed edge energy per writer, ``n`` image count,
    ``votes`` [C, k] (every writer's votes).
    """

    name = "hpse"
    tap = "pre"

    def _k(self, width: int) -> int:
        k = self.params.get("k")
        k = max(1, width // 16) if k is None else int(k)
        if k < 1:
            raise ValueError(f"hpse: k must be >= 1, got {k}")
        return min(k, width)

    def init(self, unit, space):
        return {"edge": torch.zeros(len(members(unit, "pre")), unit.width, dtype=torch.double),
                "n": torch.zeros((), dtype=torch.double),
                "votes": torch.zeros(unit.width, self._k(unit.width), dtype=torch.double)}

    def update(self, unit, state, batch: Batch):
        found = batch.every_member_map("pre", unit, self.name)
        k = state["votes"].shape[1]
        for j, maps in enumerate(found):
            edge, shape = edge_shape_maps(maps)
            state["edge"][j] += edge.sum((2, 3)).sum(0).double().cpu()
            labels = shape_labels(shape, k, seed=int(self.params.get("seed", 0)),
                                  iters=int(self.params.get("iters", 20)))
            state["votes"] += F.one_hot(labels, k).sum(0).double().cpu()
        state["n"] += found[0].shape[0]

    def score(self, space, stats):
        out = {}
        for unit in space.units:
            state = stats.of(self.name)[unit.name]
            if float(state["n"]) == 0:
                raise ValueError(f"hpse: no calibration images were seen for unit {unit.name}")
            out[unit.name] = reduce_members(state["edge"] / state["n"], same_scale=False).float()
        return out

