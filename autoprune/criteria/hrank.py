"""HRank (Lin et al., 2020): the average matrix rank of each channel's feature maps.

A channel whose H×W maps have high rank carries more information. The maps are read
at the ``post`` tap, i.e. the unit's channels as the next layer reads them (after the
activation, and after any pooling that sits between the unit and its consumer).
The streaming summary is a per-channel sum of ranks and an image count, so memory
does not grow with the number of calibration images. A unit read by several layers (a
residual stream, read by every block: the first block reads it before the later blocks
add to it) keeps one summary per reader, and its score is the mean of the readers'
average ranks (:func:`~autoprune.criteria.base.reduce_members`, ``same_scale``: ranks
count the same thing wherever they are read).

Maps that are not 2-D per channel are handled as follows: a linear layer's output
``[N, C]`` is a 1×1 map (rank 1 if non-zero, else 0); channels spread over ``S``
input positions of a consumer (a flatten into a linear layer, ``[N, C, S]``) are an
``s×s`` map when ``S = s²`` and a ``1×S`` row otherwise; higher-dimensional maps
``[N, C, ..., H, W]`` score the mean rank of their H×W slices.
"""

from __future__ import annotations

import math

import torch

from .base import Batch, Criterion, members, per_image_means, reduce_members


def map_ranks(maps: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Matrix rank of every channel's map, ``[N, C]`` (float) from maps ``[N, C, ...]``.

    ``rtol`` is passed to :func:`torch.linalg.matrix_rank` (default: its own,
    ``max(H, W)·eps`` relative to the largest singular value).
    """
    x = maps.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    n, c = x.shape[:2]
    if x.dim() == 2:
        return (x != 0).float()
    if x.dim() == 3:
        s = x.shape[2]
        side = math.isqrt(s)
        x = x.reshape(n, c, side, side) if side * side == s else x.reshape(n, c, 1, s)
    elif x.dim() > 4:
        x = x.reshape(n, c, -1, *x.shape[-2:])
        ranks = torch.linalg.matrix_rank(x, rtol=rtol) if rtol is not None else torch.linalg.matrix_rank(x)
        return ranks.float().mean(2)
    ranks = torch.linalg.matrix_rank(x, rtol=rtol) if rtol is not None else torch.linalg.matrix_rank(x)
    return ranks.float()


def mean_ranks(stats, criterion: str = "hrank") -> dict[str, torch.Tensor]:
    """Per unit, the average rank per channel from ``criterion``'s summaries in ``stats``
    (the mean over the unit's readers that saw images)."""
    out = {}
    for unit, state in stats.of(criterion).items():
        ranks = per_image_means(state["rank_sum"], state["count"], f"{criterion}: unit {unit}")
        out[unit] = reduce_members(ranks, same_scale=True).float()
    return out


class RankState:
    """Mixin with HRank's streaming summary per reader (rank sum [R, C], image count [R]);
    tap ``post``."""

    tap = "post"

    def init(self, unit, space):
        readers = len(members(unit, "post"))
        return {"rank_sum": torch.zeros(readers, unit.width, dtype=torch.double),
                "count": torch.zeros(readers, dtype=torch.double)}

    def update(self, unit, state, batch: Batch) -> None:
        for j, maps in batch.member_maps("post", unit):
            ranks = map_ranks(maps, self.params.get("rtol"))
            state["rank_sum"][j] += ranks.sum(0).double().cpu()
            state["count"][j] += ranks.shape[0]


class HRank(RankState, Criterion):
    """Average rank of each channel's H×W maps over calibration images (tap ``post``).

    Param ``rtol``: relative singular-value tolerance of the rank (default: torch's).
    """

    name = "hrank"
    tap = "post"

    def score(self, space, stats):
        return mean_ranks(stats, self.name)


__all__ = ["HRank", "map_ranks", "mean_ranks"]
