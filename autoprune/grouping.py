"""Channel clusters for cluster-aware selection (HPSE, FCHP, SG-CNN) and a small k-means.

``cluster(method, space, stats, k)`` returns, per unit, one label per channel; pass the
result to :func:`autoprune.plan.select` (``clusters=``) so every cluster keeps channels in
proportion to its size, at least one each. The methods:

* ``hpse``: the mode over calibration images of each channel's per-image shape cluster
  (k-means over the flattened shape maps, relabelled by ascending mean shape energy);
  collected by the ``hpse`` criterion during calibration.
* ``fchp``: k-means over each channel's correlation profile with the next unit's maps
  (``fchp`` criterion; a **reconstruction**, see :mod:`autoprune.criteria.fchp`).
* ``sg``: k-means (several restarts) over the SG-CNN importance vectors
  ``v_i[j] = Σ_hw |W[i, j, h, w]|`` of the unit's filters; weights only.

:func:`kmeans` is deterministic for a given seed (seeded k-means++ init, Lloyd
iterations, empty clusters refilled) and batched internally, so HPSE can cluster every
image of a batch at once.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .errors import ModelError, OptionError, short

__all__ = ["METHODS", "cluster", "importance_vectors", "kmeans", "kmeans_batched"]

METHODS = ("hpse", "fchp", "sg")


# ----------------------------------------------------------------------------- k-means

def _sq_dist(x: torch.Tensor, c: torch.Tensor, xx: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances [B, n, k] between points x [B, n, d] and centres c [B, k, d]
    (``xx``: the points' squared norms [B, n, 1], if already known)."""
    xx = (x * x).sum(-1, keepdim=True) if xx is None else xx
    d = xx - 2 * x @ c.transpose(1, 2) + (c * c).sum(-1).unsqueeze(1)
    return d.clamp_min(0)


def _means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Cluster means [B, k, d] (an empty cluster's mean is 0; callers refill empties first)."""
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [B, n, k]
    counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)
    return onehot.transpose(1, 2) @ x / counts


def _fill_empty(labels: torch.Tensor, dist: torch.Tensor, k: int) -> None:
    """Give every empty cluster the point farthest from its centre, taken from a cluster
    with more than one member (in place). Needs n >= k; rare, so a plain loop."""
    counts = torch.nn.functional.one_hot(labels, k).sum(1)  # [B, k]
    for b in torch.nonzero((counts == 0).any(1)).flatten().tolist():
        lab, cnt = labels[b], counts[b].clone()
        own = dist[b].gather(1, lab.unsqueeze(1)).squeeze(1).clone()
        for empty in torch.nonzero(cnt == 0).flatten().tolist():
            movable = cnt[lab] > 1
            i = int(torch.where(movable, own, torch.full_like(own, -1.0)).argmax())
            cnt[lab[i]] -= 1
            lab[i] = empty
            cnt[empty] = 1
            own[i] = -1.0


def _init_pp(x: torch.Tensor, k: int, gen: torch.Generator, xx: torch.Tensor) -> torch.Tensor:
    """Seeded k-means++ centres [B, k, d] (D² sampling; ties to uniform when all D² are 0)."""
    B, n, _ = x.shape
    rows = torch.arange(B, device=x.device)
    first = torch.randint(n, (B,), generator=gen).to(x.device)
    centres = [x[rows, first]]
    closest = _sq_dist(x, centres[0].unsqueeze(1), xx).squeeze(-1)  # [B, n]
    for _ in range(1, k):
        w = closest.double().cpu()
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        pick = torch.multinomial(w, 1, generator=gen).squeeze(1).to(x.device)
        centres.append(x[rows, pick])
        closest = torch.minimum(closest, _sq_dist(x, centres[-1].unsqueeze(1), xx).squeeze(-1))
    return torch.stack(centres, 1)


def _lloyd(x: torch.Tensor, k: int, gen: torch.Generator, iters: int):
    """Batched k-means on x [B, n, d] with k <= n: (labels [B, n], centres [B, k, d], inertia [B])."""
    xx = (x * x).sum(-1, keepdim=True)
    centres = _init_pp(x, k, gen, xx)
    dist = _sq_dist(x, centres, xx)
    labels = dist.argmin(-1)
    _fill_empty(labels, dist, k)
    for _ in range(iters):
        centres = _means(x, labels, k)
        dist = _sq_dist(x, centres, xx)
        new = dist.argmin(-1)
        _fill_empty(new, dist, k)
        if torch.equal(new, labels):
            break
        labels = new
    centres = _means(x, labels, k)
    inertia = _sq_dist(x, centres, xx).gather(2, labels.unsqueeze(-1)).squeeze(-1).sum(1)
    return labels, centres, inertia


def kmeans_batched(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50):
    """k-means of each of B point sets x [B, n, d] at once (one seeded init each).

    Returns labels [B, n] (every label 0..k-1 used) and centres [B, k, d]; k is capped at n.
    """
    B, n, _ = x.shape
    k = max(1, min(int(k), n))
    if k == 1:
        return torch.zeros(B, n, dtype=torch.long, device=x.device), x.mean(1, keepdim=True)
    gen = torch.Generator().manual_seed(int(seed))
    labels, centres, _ = _lloyd(x, k, gen, iters)
    return labels, centres


def kmeans(x: torch.Tensor, k: int, seed: int = 0, iters: int = 50, restarts: int = 1):
    """Deterministic k-means of the rows of ``x`` [n, d]: (labels LongTensor[n], centroids [k, d]).

    k-means++ init from a generator seeded with ``seed``; ``restarts`` independent inits
    run together and the lowest within-cluster sum of squares wins (ties: the first).
    Empty clusters are refilled with far points, so every label 0..k-1 is used; k is
    capped at n. Labels are numbered in order of first appearance, so equal partitions
    give equal labels. Computed in float64.
    """
    x = torch.as_tensor(x).double()
    if x.dim() != 2:
        raise OptionError(f"kmeans expects points as [n, d], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long), x.new_zeros(0, x.shape[1])
    k = max(1, min(int(k), n))
    if k == 1:
        return torch.zeros(n, dtype=torch.long, device=x.device), x.mean(0, keepdim=True)
    gen = torch.Generator().manual_seed(int(seed))
    labels, centres, inertia = _lloyd(x.unsqueeze(0).expand(max(1, int(restarts)), -1, -1),
                                      k, gen, iters)
    best = int(inertia.argmin())
    labels, centres = labels[best], centres[best]
    # canonical numbering: first-appearance order
    first = torch.full((k,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=x.device), reduce="amin")
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=x.device)
    return rank[labels], centres[order]


# ----------------------------------------------------------------------------- clustering

def _k_for(k, unit, default: int) -> int:
    """The cluster count for ``unit``: ``k`` (int, or dict unit → int) else ``default``; 1..width."""
    if isinstance(k, Mapping):
        k = k.get(unit.name)
    k = default if k is None else int(k)
    if k < 1:
        raise OptionError(f"unit {unit.name}: cluster count k must be an integer >= 1, got {short(k)}")
    return min(k, unit.width)


def importance_vectors(space, unit) -> torch.Tensor:
    """SG-CNN importance vectors [width, Σ inputs]: ``v_i[j] = Σ_hw |W[i, j, h, w]|``.

    Taken over every root layer of the unit whose output is the unit's channels (one
    layer for a plain conv; the convs summed by a residual add are concatenated).
    """
    parts = []
    for name in unit.modules:
        w = space.model.get_submodule(name).weight.detach().double().cpu()
        if w.shape[0] == unit.width:
            parts.append(w.abs().flatten(2).sum(2) if w.dim() > 2 else w.abs())
    if not parts:
        raise ModelError(f"sg: unit {unit.name} has no root layer with {unit.width} output channels")
    return torch.cat(parts, 1)


def _hpse(space, stats, k) -> dict[str, np.ndarray]:
    per_unit = stats.of("hpse")
    out = {}
    for unit in space.units:
        votes = per_unit[unit.name]["votes"]
        if k is not None and _k_for(k, unit, votes.shape[1]) != votes.shape[1]:
            raise OptionError(f"hpse: unit {unit.name} was calibrated with k={votes.shape[1]}; "
                             f"the cluster count is fixed at calibration (criterion param 'k')")
        out[unit.name] = votes.argmax(1).cpu().numpy().astype(np.int64)  # ties: lower label
    return out


def _fchp(space, stats, k, seed: int) -> dict[str, np.ndarray]:
    per_unit = stats.of("fchp")
    out = {}
    for unit in space.units:
        state = per_unit[unit.name]
        kk = _k_for(k, unit, max(1, unit.width // 16))
        n = float(state["n"])
        if state["corr"].shape[1] == 0 or n == 0:  # no next unit (or no data): one cluster
            out[unit.name] = np.zeros(unit.width, dtype=np.int64)
            continue
        labels, _ = kmeans(state["corr"].double().cpu() / n, kk, seed=seed)
        out[unit.name] = labels.numpy()
    return out


def _sg(space, k, seed: int, restarts: int) -> dict[str, np.ndarray]:
    out = {}
    for unit in space.units:
        labels, _ = kmeans(importance_vectors(space, unit), _k_for(k, unit, 16),
                           seed=seed, restarts=restarts)
        out[unit.name] = labels.numpy()
    return out


def cluster(method: str, space, stats=None, k: int | Mapping[str, int] | None = None, *,
            seed: int = 0, restarts: int = 5) -> dict[str, np.ndarray]:
    """Per unit, int64 labels [width] with values in 0..k-1 for :func:`~autoprune.plan.select`.

    ``method``: ``"hpse"`` (needs stats from the ``hpse`` criterion; k was fixed at
    calibration, so ``k`` must be None or agree), ``"fchp"`` (needs ``fchp`` stats;
    default k = width // 16, at least 1; a unit with no next unit gets one cluster) or
    ``"sg"`` (weights only, ``stats`` may be None; default k = 16, ``restarts`` inits).
    ``k`` is an int for every unit or a dict unit → int (missing units: the default);
    it is capped at the unit's width.
    """
    if method in ("hpse", "fchp") and stats is None:
        raise OptionError(f"cluster({method!r}) reads calibration stats: run "
                         f"calibrate(..., criteria=[{method!r}]) and pass them")
    if method == "hpse":
        return _hpse(space, stats, k)
    if method == "fchp":
        return _fchp(space, stats, k, seed)
    if method == "sg":
        return _sg(space, k, seed, restarts)
    raise OptionError(f"unknown clustering method {short(method)}; choose one of {', '.join(METHODS)}")
