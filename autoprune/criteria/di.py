"""Discriminant Information (DI; Hou & Kung, 2020, arXiv 2005.13796).

For features ``x_i`` with class labels, ``DI = tr[(S̄ + ρI)⁻¹ S_B]``: the ridge-regularised
ratio of between-class scatter ``S_B`` to total scatter ``S̄``. DI never decreases when a
feature is added, so the channel whose removal lowers DI least carries least
discriminant power. Both forms read the unit's root conv outputs before their norm layers
(tap ``"pre"``), as METHODS.md §1 prescribes — every root of the unit: a residual stream
is written by several convs (the stage's first conv or shortcut and each block's second
conv), and pruning a channel removes it from all of them.

* Coupled units, pooled form: one summary per writer (a leading member axis), each
  writer's exact ΔDI, and the unit's score their mean
  (:func:`~autoprune.criteria.base.reduce_members`, ``same_scale``): DI is dimensionless
  and unchanged when a writer's features are rescaled (the default ridge scales with
  them), so the writers' ΔDI are on one scale and a writer carrying no class
  information adds about nothing instead of a normalised vote. The exact joint ΔDI of
  all writers' features would need an (M·C)² scatter per unit; the mean keeps M·C².
* Coupled units, full-map form: exactly the joint quantity, since the sample-space form
  costs N×N whatever the feature count: the writers' flattened maps are concatenated per
  channel and one mask ``m_c`` scales channel c in every writer.

* ``di`` (default, channel-pooled): ``x_i`` is the global-average-pooled map, so
  ``D = C`` and the exact drop from removing channel ``c`` has the closed form
  ``ΔDI_c = (M S_B M)_cc / M_cc`` with ``M = (S̄ + ρI)⁻¹`` — one C×C inverse per unit.
  This form is METHODS.md's default; the paper's own scoring uses full maps.
* ``di_fullmap`` (the authors' released-code form as METHODS.md describes it): per
  batch, DI of the flattened C·H·W maps via the sample-space identity, and each channel
  is scored by ``|∂DI/∂m_c|`` for a multiplicative channel mask ``m = 1``, summed over
  batches. Details not fixed by METHODS.md (the label scaling, per-batch ``|·|``) are
  documented options/choices below — treat them as **reconstruction**.

The pure functions (:func:`di`, :func:`delta_di`, :func:`di_from_scatter`,
:func:`delta_di_from_scatter`, :func:`scatter_from_summary`, :func:`fullmap_di`,
:func:`fullmap_channel_grads`) are the same maths for tests and for the DI greedy
budget optimiser, which needs DI of channel subsets from the same summaries.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CriterionError
from .base import Batch, Criterion, members, reduce_members

DEFAULT_RHO_REL = 1e-3
"""Default ridge of the pooled form, relative to the mean total-scatter eigenvalue."""
DEFAULT_FULLMAP_RHO = 0.1
"""Default ridge of the full-map form (the authors' value; absolute, in map units²)."""


# ---------------------------------------------------------------------------------------
# Pure functions: the channel-pooled form


def _as_double(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().cpu().double()


def _as_labels(labels, n: int) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    y = y.detach().cpu()
    if y.dim() != 1 or y.numel() != n:
        raise ValueError(f"DI needs one integer class label per sample: got labels of shape "
                         f"{tuple(y.shape)} for {n} samples")
    if y.is_floating_point() or y.is_complex():
        if not torch.equal(y, y.round()):
            raise ValueError("DI needs integer class labels, not soft/one-hot targets")
    y = y.long()
    if n and int(y.min()) < 0:
        raise ValueError(f"DI needs class labels ≥ 0, got {int(y.min())}")
    return y


def summarise(features, labels, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Sufficient statistics of ``features`` [N, D] with ``labels`` [N] (float64).

    ``counts`` [L] (samples per class), ``class_sums`` [L, D] (per-class feature sums),
    ``second`` [D, D] (Σ x xᵀ). Summaries of disjoint sample sets add up.
    """
    x = _as_double(features)
    if x.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
    y = _as_labels(labels, x.shape[0])
    n_cls = int(y.max()) + 1 if y.numel() else 0
    if num_classes is not None:
        if n_cls > num_classes:
            raise ValueError(f"label {n_cls - 1} out of range for num_classes={num_classes}")
        n_cls = num_classes
    counts = torch.zeros(n_cls, dtype=torch.double).index_add_(0, y, torch.ones(len(y), dtype=torch.double))
    sums = torch.zeros(n_cls, x.shape[1], dtype=torch.double).index_add_(0, y, x)
    return {"counts": counts, "class_sums": sums, "second": x.T @ x}


def member_summaries(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The :class:`DI` criterion's unit summary split into one :func:`summarise`-shaped
    summary per member (writer layer, in :func:`~autoprune.criteria.base.members` order)."""
    return [{"counts": state["counts"], "class_sums": sums, "second": second}
            for sums, second in zip(state["class_sums"], state["second"])]


def scatter_from_summary(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Total scatter ``S̄ = Σxxᵀ − Nμμᵀ`` and between-class scatter ``S_B`` from summaries.

    Raises ValueError when fewer than two classes were seen: DI is then undefined
    (``S_B = 0`` whatever the channels), so it cannot rank them.
    """
    counts = state["counts"].double()
    sums = state["class_sums"].double()
    second = state["second"].double()
    if second.dim() != 2:
        raise ValueError(f"a DI summary of one feature set has second [D, D], got {tuple(second.shape)}: "
                         "split a DI criterion's unit summary with member_summaries(state)")
    present = counts > 0
    n = float(counts.sum())
    if n == 0:
        raise ValueError("DI saw no calibration samples")
    if int(present.sum()) < 2:
        seen = torch.nonzero(present).flatten().tolist()
        raise CriterionError(f"DI needs ≥2 classes in the calibration data; got {len(seen)} "
                             f"(class {seen}): use more (shuffled) calibration images, from several "
                             "classes (--calib-images)")
    mu = sums.sum(0) / n
    total = second - n * torch.outer(mu, mu)
    total = (total + total.T) / 2  # exact symmetry despite rounding
    cs, cn = sums[present], counts[present]
    between = (cs.T / cn) @ cs - n * torch.outer(mu, mu)
    between = (between + between.T) / 2
    return total, between


def default_rho(total: torch.Tensor, rel: float = DEFAULT_RHO_REL) -> float:
    """Scale-free ridge ``rel · tr(S̄)/D``; 1.0 when the features are constant (then DI = 0)."""
    rho = rel * float(torch.trace(total)) / total.shape[0]
    return rho if rho > 0 else 1.0


def _ridge_inverse(total: torch.Tensor, rho: float) -> torch.Tensor:
    if not rho > 0:
        raise ValueError(f"DI ridge rho must be > 0, got {rho}")
    a = total + rho * torch.eye(total.shape[0], dtype=total.dtype)
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.inv(a)


def _restrict(total, between, keep):
    if keep is None:
        return total, between
    idx = torch.as_tensor(keep)
    idx = torch.nonzero(idx).flatten() if idx.dtype == torch.bool else idx.long()
    return total[idx][:, idx], between[idx][:, idx]


def di_from_scatter(total: torch.Tensor, between: torch.Tensor, rho: float, keep=None) -> float:
    """``tr[(S̄ + ρI)⁻¹ S_B]``, optionally over the channel subset ``keep`` (indices or mask)."""
    t, b = _restrict(total.double(), between.double(), keep)
    if t.shape[0] == 0:
        return 0.0
    return float(torch.sum(_ridge_inverse(t, rho) * b))  # tr(M B) with M, B symmetric


def delta_di_from_scatter(total: torch.Tensor, between: torch.Tensor, rho: float,
                          keep=None) -> torch.Tensor:
    """Exact DI drop from removing each channel alone: ``(M S_B M)_cc / M_cc`` [D] (float64).

    With ``keep``, the scores are for the kept channels only, in ``keep`` order.
    Exact because removing row/column c of ``A = S̄+ρI`` gives
    ``A⁻¹ = pad(A₋c⁻¹) + M e_c e_cᵀ M / M_cc``.
    """
    t, b = _restrict(total.double(), between.double(), keep)
    m = _ridge_inverse(t, rho)
    return torch.diagonal(m @ b @ m) / torch.diagonal(m)


def _float64_ready(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """``maps`` detached, moved to the CPU unless their device computes in float64."""
    return [m.detach() if m.device.type in ("cpu", "cuda") else m.detach().cpu() for m in maps]


def _pooled(features) -> torch.Tensor:
    x = _as_double(features)
    return x.flatten(2).mean(2) if x.dim() > 2 else x


def di(features, labels, rho: float | None = None) -> float:
    """DI of ``features`` ([N, D], or maps [N, C, ...] which are global-average-pooled).

    ``rho`` defaults to ``1e-3 · tr(S̄)/D``.
    """
    total, between = scatter_from_summary(summarise(_pooled(features), labels))
    return di_from_scatter(total, between, default_rho(total) if rho is None else rho)


def delta_di(features, labels, rho: float | None = None):
    """Per-feature ΔDI = DI(all) − DI(all but that feature), same ``rho`` for both.

    Returns a numpy array for numpy input, else a float64 tensor.
    """
    total, between = scatter_from_summary(summarise(_pooled(features), labels))
    out = delta_di_from_scatter(total, between, default_rho(total) if rho is None else rho)
    return out if isinstance(features, torch.Tensor) else out.numpy()


# ---------------------------------------------------------------------------------------
# Pure functions: the full-map (sample-space) form


def _centred_targets(labels: torch.Tensor, scaled: bool, dtype, device) -> torch.Tensor:
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    y = torch.nn.functional.one_hot(inverse, len(classes)).to(dtype=dtype, device=device)
    if scaled:
        y = y / counts.to(dtype=dtype, device=device).sqrt()
    return y - y.mean(0, keepdim=True)


def fullmap_di(maps: torch.Tensor, labels, rho: float = DEFAULT_FULLMAP_RHO,
               mask: torch.Tensor | None = None, scaled_labels: bool = False) -> torch.Tensor:
    """DI of one batch of flattened maps via ``tr(ȲᵀȲ) − ρ·tr[Ȳᵀ(X̄X̄ᵀ + ρI_N)⁻¹Ȳ]``.

    ``maps`` [N, C, ...] (computed in float64 on their device); ``mask`` [C] multiplies
    each channel (differentiable). Ȳ are centred one-hot labels; it equals
    ``tr[(S̄+ρI)⁻¹ X̄ᵀȲȲᵀX̄]``, i.e. weights class l's between-class term by ``N_l²``
    (``N/L · DI`` for balanced classes). ``scaled_labels=True`` divides each one-hot
    column by ``√N_l`` so the value is exactly ``tr[(S̄+ρI)⁻¹ S_B]`` of the flat maps.
    """
    if not rho > 0:
        raise ValueError(f"DI ridge rho must be > 0, got {rho}")
    x = maps.detach().double()
    n = x.shape[0]
    y = _centred_targets(_as_labels(labels, n).to(x.device), scaled_labels, x.dtype, x.device)
    xc = (x - x.mean(0, keepdim=True)).reshape(n, x.shape[1], -1)  # centring commutes with the mask
    if mask is not None:
        xc = xc * mask.to(x.dtype).view(1, -1, 1)
    xc = xc.reshape(n, -1)
    k = xc @ xc.T + rho * torch.eye(n, dtype=x.dtype, device=x.device)
    return (y * y).sum() - rho * (y * torch.linalg.solve(k, y)).sum()


def fullmap_channel_grads(maps: torch.Tensor, labels, rho: float = DEFAULT_FULLMAP_RHO,
                          scaled_labels: bool = False) -> torch.Tensor:
    """``|∂DI/∂m_c|`` at ``m = 1`` for one batch (autograd), float64 on CPU, [C]."""
    mask = torch.ones(maps.shape[1], dtype=torch.double, device=maps.device, requires_grad=True)
    with torch.enable_grad():
        value = fullmap_di(maps, labels, rho, mask=mask, scaled_labels=scaled_labels)
        (grad,) = torch.autograd.grad(value, mask)
    return grad.abs().detach().cpu()


# ---------------------------------------------------------------------------------------
# Criteria


class DI(Criterion):
    """Channel-pooled exact ΔDI (the default DI score): GAP each ``pre`` map, keep
    per-class counts and sums and Σxxᵀ in float64, score ``(M S_B M)_cc / M_cc``; a unit
    with several writers scores the mean of their ΔDI (module docstring).

    State: ``counts`` [L] (shared), ``class_sums`` [W, L, C] and ``second`` [W, C, C],
    one slice per writer (:func:`member_summaries`).

    Params: ``rho`` (absolute ridge; default ``rho_rel · tr(S̄)/C``), ``rho_rel``
    (default 1e-3), ``num_classes`` (sizes the class summaries up front and rejects
    larger labels; without it they start empty and grow when a larger label appears —
    their size is bounded by the class count, never by the image count).
    """

    name = "di"
    tap = "pre"

    def init(self, unit, space):
        n_cls = int(self.params.get("num_classes") or 0)
        w, m = unit.width, len(members(unit, "pre"))
        return {"counts": torch.zeros(n_cls, dtype=torch.double),
                "class_sums": torch.zeros(m, n_cls, w, dtype=torch.double),
                "second": torch.zeros(m, w, w, dtype=torch.double)}

    def update(self, unit, state, batch: Batch):
        found = _float64_ready(batch.every_member_map("pre", unit, self.name))
        y = _as_labels(batch.labels, found[0].shape[0])
        if not len(y):
            return
        needed = int(y.max()) + 1
        have = state["counts"].shape[0]
        if needed > have:
            if self.params.get("num_classes"):
                raise ValueError(f"di: label {needed - 1} out of range for "
                                 f"num_classes={self.params['num_classes']}")
            sums = state["class_sums"]
            state["counts"] = torch.cat([state["counts"], state["counts"].new_zeros(needed - have)])
            state["class_sums"] = torch.cat(
                [sums, sums.new_zeros(sums.shape[0], needed - have, sums.shape[2])], dim=1)
        state["counts"] += torch.bincount(y, minlength=state["counts"].shape[0]).double()
        for j, fm in enumerate(found):
            x = fm.double().flatten(2).mean(2) if fm.dim() > 2 else fm.double()
            sums = x.new_zeros(state["class_sums"].shape[1:]).index_add_(0, y.to(x.device), x)
            state["class_sums"][j] += sums.cpu()
            state["second"][j] += (x.T @ x).cpu()

    def score(self, space, stats):
        per_unit = stats.of(self.name)
        out = {}
        for unit in space.units:
            drops = []
            for summary in member_summaries(per_unit[unit.name]):
                try:
                    total, between = scatter_from_summary(summary)
                except ValueError as exc:
                    raise type(exc)(f"di: unit {unit.name}: {exc}") from None
                rho = self.params.get("rho")
                if rho is None:
                    rho = default_rho(total, float(self.params.get("rho_rel", DEFAULT_RHO_REL)))
                drops.append(delta_di_from_scatter(total, between, float(rho)))
            out[unit.name] = reduce_members(torch.stack(drops), same_scale=True)
        return out


class DIFullMap(Criterion):
    """The authors' full-map DI: per batch, ``|∂DI/∂m_c|`` of the sample-space DI of the
    flattened ``pre`` maps under a channel mask ``m = 1``, summed over batches.

    Params: ``rho`` (default 0.1, absolute — the map's scale matters), ``scaled_labels``
    (default False: centred one-hot Ȳ as in METHODS.md; True: columns divided by √N_l,
    giving exactly tr[(S̄+ρI)⁻¹S_B] per batch). Reconstruction choices: |·| is taken
    per batch before summing (∂DI/∂m_c ≥ 0 anyway, as a larger channel scale only
    weakens the ridge on it); a batch holding one class has DI = 0 and adds nothing.
    State: ``grad`` [C] plus two counters (batches seen / with ≥2 classes) so that an
    uninformative calibration set raises instead of scoring all-zero. A unit with several
    writers is one feature set: channel c's features are every writer's map of c, and
    ``m_c`` scales them all (the exact group quantity; one writer: as before).
    """

    name = "di_fullmap"
    tap = "pre"

    def init(self, unit, space):
        return {"grad": torch.zeros(unit.width, dtype=torch.double),
                "batches": torch.zeros((), dtype=torch.long),
                "informative": torch.zeros((), dtype=torch.long)}

    def update(self, unit, state, batch: Batch):
        found = _float64_ready(batch.every_member_map("pre", unit, self.name))
        n = found[0].shape[0]
        # one feature set per channel: every writer's map of it (one mask scales them all)
        fm = found[0] if len(found) == 1 else torch.cat([f.reshape(n, unit.width, -1) for f in found], 2)
        y = _as_labels(batch.labels, fm.shape[0])
        state["batches"] += 1
        if len(torch.unique(y)) < 2:
            return
        state["informative"] += 1
        rho = float(self.params.get("rho", DEFAULT_FULLMAP_RHO))
        state["grad"] += fullmap_channel_grads(fm, y, rho, bool(self.params.get("scaled_labels", False)))

    def score(self, space, stats):
        per_unit = stats.of(self.name)
        out = {}
        for unit in space.units:
            state = per_unit[unit.name]
            if int(state["batches"]) == 0:
                raise ValueError(f"di_fullmap: unit {unit.name}: saw no calibration batches")
            if int(state["informative"]) == 0:
                raise CriterionError(f"di_fullmap: unit {unit.name}: DI needs ≥2 classes in the "
                                     f"calibration data, and every one of {int(state['batches'])} "
                                     "batches held a single class (shuffle the calibration data, or "
                                     "use more images: --calib-images)")
            out[unit.name] = state["grad"].clone()
        return out


__all__ = ["DI", "DIFullMap", "default_rho", "delta_di", "delta_di_from_scatter", "di",
           "di_from_scatter", "fullmap_channel_grads", "fullmap_di", "member_summaries",
           "scatter_from_summary", "summarise"]
