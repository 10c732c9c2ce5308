"""First-order Taylor importance (Molchanov et al., ICLR 2017): |a · ∂L/∂a|.

Removing channel c changes the loss by about ``a_c · ∂L/∂a_c`` (a first-order
expansion around the current activation). Per image ``i`` with loss ``ℓ_i``
(cross-entropy of that image), the channel's contribution is summed over its spatial
positions and the absolute value taken; the score is the mean over images::

    Θ_c = mean_i | Σ_hw a[i,c,h,w] · ∂ℓ_i/∂a[i,c,h,w] |

Read at the ``post`` tap (the unit's channels as the next layer reads them, after
the activation). Calibration differentiates the batch-mean loss, so gradients are
multiplied by the batch size to get each image's own ``∂ℓ_i/∂a``; the score thus does
not depend on how images are batched.

A unit read by several layers (a residual stream, read by every block) keeps one summary
per reader — the stream at that depth, whose gradient covers every path after it — and
scores the mean over readers (:func:`~autoprune.criteria.base.reduce_members`,
``same_scale``: every reader's Θ is a change of the same loss).
"""

from __future__ import annotations

import torch

from .base import Batch, Criterion, members, per_image_means, reduce_members


class Taylor(Criterion):
    """Mean over images of |Σ_spatial a·∂ℓ/∂a| per channel (tap ``post``, needs gradients)."""

    name = "taylor"
    tap = "post"
    needs_grad = True

    def init(self, unit, space):
        readers = len(members(unit, "post"))
        return {"sum": torch.zeros(readers, unit.width, dtype=torch.double),
                "count": torch.zeros(readers, dtype=torch.double)}

    def update(self, unit, state, batch: Batch) -> None:
        grads = batch.member_grads("post", unit)
        for j, a in batch.member_maps("post", unit):
            n = a.shape[0]
            g = grads.get(j)
            if g is not None:  # no gradient: the channels do not reach the loss (contribution 0)
                prod = (a.double() * g.double() * n).reshape(n, unit.width, -1).sum(2)
                state["sum"][j] += prod.abs().sum(0).cpu()
            state["count"][j] += n

    def score(self, space, stats):
        out = {}
        for unit, state in stats.of(self.name).items():
            theta = per_image_means(state["sum"], state["count"], f"taylor: unit {unit}")
            out[unit] = reduce_members(theta, same_scale=True).float()
        return out


__all__ = ["Taylor"]
