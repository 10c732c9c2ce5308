"""SG-CNN self-grouping: diverse group convolution (Guo et al., Neural Networks 2020).

A dense ``nn.Conv2d`` is split into groups of filters that each read their own
subset of the input channels:

1. importance vector of filter ``i``: ``v_i[j] = Σ_hw |W[i, j, h, w]|``;
2. k-means over the filters' importance vectors → groups ``G_g``, centroids ``c_g``;
3. threshold ``τ`` = the ``cp``-th percentile (``cp`` a fraction) of all centroid
   entries, centroid ``g`` counted once per member (``|G_g|`` times);
4. group ``g`` keeps the inputs ``S_g = {j : c_g[j] > τ}`` (its argmax if none passes).

:class:`~autoprune.selfgroup_layers.DiverseGroupConv` runs the result as a real smaller
computation (``Σ_g |S_g|·|G_g|·kh·kw·H·W`` FLOPs per image, what fvcore counts).
**Reconstruction**: fully connected layers are grouped by the same rule with
``v_i[j] = |W[i, j]|`` (:class:`~autoprune.selfgroup_layers.DiverseGroupLinear`);
METHODS.md §6 describes conv layers only. :func:`fit_cp` solves ``cp`` for a budget.

A *spec* describes the grouping of a model and is plain JSON::

    {layer_name: {"groups": [group of filter 0, group of filter 1, ...],
                  "inputs": [[sorted kept inputs of group 0], [... group 1], ...]}}

Self-grouping is applied *after* channel pruning: layer names and channel indices
refer to the (pruned) model the spec was computed on. ``apply_self_grouping`` re-applies
a stored spec, so a Plan holding one can rebuild the grouped model on load.
"""

from __future__ import annotations

import copy as _copy
import math
import numbers
from typing import Iterable, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from .errors import BudgetError, ModelError, OptionError, short
from .grouping import kmeans
from .selfgroup_layers import DiverseGroupConv, DiverseGroupLayer, DiverseGroupLinear, pair
from .space import forward_with_hooks

Spec = dict  # {layer_name: {"groups": list[int], "inputs": list[list[int]]}}
Dense = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------- grouping


def importance_vectors(layer: nn.Conv2d | nn.Linear) -> np.ndarray:
    """``v[i, j] = Σ_hw |W[i, j, h, w]|`` (a linear: ``|W[i, j]|``) as float64 ``[out, in]``."""
    w = layer.weight.detach().abs()
    return (w.sum(dim=(2, 3)) if w.dim() == 4 else w).double().cpu().numpy()


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Groups numbered 0..G-1 in order of their lowest filter index, none empty (what
    ``grouping.kmeans`` already returns; kept so the spec's invariants never depend on it)."""
    order = {}
    for lab in labels.tolist():
        order.setdefault(lab, len(order))
    return np.array([order[lab] for lab in labels.tolist()], dtype=int)


def connection_threshold(centroids: np.ndarray, sizes: Iterable[int], cp: float) -> float:
    """``τ``: the ``cp``-th percentile (``cp`` in [0, 1], numpy's linear interpolation) of
    all centroid entries, centroid ``g``'s entries counted ``sizes[g]`` times."""
    if not 0.0 <= cp <= 1.0:
        raise OptionError(f"cp must be a fraction in [0, 1] (e.g. 0.5), got {short(cp)}")
    c = np.asarray(centroids, dtype=np.float64)
    weighted = np.repeat(c, np.asarray(list(sizes), dtype=int), axis=0)
    return float(np.percentile(weighted.ravel(), 100.0 * cp))


def group_inputs(centroids: np.ndarray, sizes: Iterable[int], cp: float) -> list[list[int]]:
    """Per group ``S_g = {j : c_g[j] > τ}``, its argmax where that is empty; ``cp = 0``
    keeps every connection. The sets only shrink as ``cp`` grows."""
    c = np.asarray(centroids, dtype=np.float64)
    if cp <= 0:
        connection_threshold(c, sizes, cp)  # validates cp
        return [list(range(c.shape[1])) for _ in range(len(c))]
    tau = connection_threshold(c, sizes, cp)
    out = []
    for row in c:
        kept = np.flatnonzero(row > tau).tolist()
        out.append(kept or [int(np.argmax(row))])
    return out


class Clustering(NamedTuple):
    """One layer's filter groups (canonical labels), their sizes and centroids: what
    SG-CNN computes once per layer, before (and independently of) ``cp``."""

    labels: list[int]
    sizes: np.ndarray
    centroids: np.ndarray

    def entry(self, cp: float) -> dict:
        """The spec entry at connection ratio ``cp``."""
        return {"groups": list(self.labels), "inputs": group_inputs(self.centroids, self.sizes, cp)}


def cluster_filters(layer: nn.Conv2d | nn.Linear, k: int = 16, seed: int = 0,
                    restarts: int = 5) -> Clustering:
    """k-means (``min(k, out)`` groups, ``restarts`` inits) of ``layer``'s importance vectors."""
    if type(layer) not in Dense or getattr(layer, "groups", 1) != 1:
        raise ModelError(f"self-grouping needs a dense nn.Conv2d (groups=1) or nn.Linear, got {layer}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise OptionError(f"k (filter groups) must be an integer >= 1, got {short(k)}")
    v = importance_vectors(layer)
    labels, _ = kmeans(torch.from_numpy(v), min(int(k), v.shape[0]), seed=seed, restarts=restarts)
    labels = _canonical(labels.cpu().numpy())
    n = labels.max() + 1
    centroids = np.stack([v[labels == g].mean(0) for g in range(n)])
    return Clustering(labels.tolist(), np.bincount(labels, minlength=n), centroids)


def self_group_entry(conv: nn.Conv2d | nn.Linear, k: int = 16, cp: float = 0.5, seed: int = 0,
                     restarts: int = 5) -> dict:
    """The spec entry SG-CNN gives ``conv`` (or a linear): k-means groups and their inputs."""
    return cluster_filters(conv, k, seed, restarts).entry(cp)


def group_layer(layer: nn.Conv2d | nn.Linear, groups: Iterable[int],
                inputs: Iterable[Iterable[int]]) -> DiverseGroupLayer:
    """The diverse group layer of ``layer`` (a conv or a linear) with its weights."""
    if isinstance(layer, nn.Linear):
        return DiverseGroupLinear.from_linear(layer, groups, inputs)
    return DiverseGroupConv.from_conv(layer, groups, inputs)


def self_group(conv: nn.Conv2d | nn.Linear, k: int = 16, cp: float = 0.5, seed: int = 0,
               restarts: int = 5) -> DiverseGroupLayer:
    """SG-CNN's diverse group convolution (or linear) replacing the dense ``conv`` (k capped
    at its output channels; ``cp`` the fraction of (member-weighted) centroid entries pruned)."""
    entry = self_group_entry(conv, k, cp, seed, restarts)
    return group_layer(conv, entry["groups"], entry["inputs"])


# --------------------------------------------------------------------------- models


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def eligible_convs(model: nn.Module, min_in_channels: int = 8,
                   min_in_channels_1x1: int = 32) -> list[str]:
    """Names of the convs ``"all"`` self-groups, in definition order.

    Every ``nn.Conv2d`` with ``groups == 1`` (depthwise and grouped convs are already
    sparse in their inputs) that has at least ``min_in_channels`` inputs (this leaves out
    the RGB stem) and, for 1×1 kernels, at least ``min_in_channels_1x1`` (small pointwise
    convs such as projection shortcuts save little and pay the gather/concat overhead).
    Already grouped convs (:class:`DiverseGroupConv`) are not ``nn.Conv2d`` and are skipped.
    """
    names = []
    for name, m in model.named_modules():
        if type(m) is not nn.Conv2d or m.groups != 1 or m.out_channels < 2:
            continue
        pointwise = tuple(m.kernel_size) == (1, 1)
        if m.in_channels < (min_in_channels_1x1 if pointwise else min_in_channels):
            continue
        names.append(name)
    return names


def eligible_linears(model: nn.Module, min_in_features: int = 32) -> list[str]:
    """Names of the ``nn.Linear`` layers SG-CNN groups, in definition order: those with at
    least 2 outputs and ``min_in_features`` inputs (a linear is a 1×1 conv, so the pointwise
    rule of :func:`eligible_convs` applies). **Reconstruction** (see the module doc)."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and m.out_features >= 2 and m.in_features >= min_in_features]


def eligible_layers(model: nn.Module) -> list[str]:
    """:func:`eligible_convs` then :func:`eligible_linears`: every layer method ``selfgroup``
    groups."""
    return eligible_convs(model) + eligible_linears(model)


def _per_conv(value, name: str, what: str):
    if isinstance(value, Mapping):
        if name not in value:
            raise OptionError(f"{what} given per conv but missing for {name!r}; give it for every conv or one value for all")
        return value[name]
    return value


def self_group_model(model: nn.Module, convs: list[str] | str = "all", k: int | Mapping[str, int] = 16,
                     cp: float | Mapping[str, float] = 0.5, seed: int = 0, restarts: int = 5,
                     copy: bool = True) -> tuple[nn.Module, Spec]:
    """Self-group ``convs`` of ``model``; returns the grouped model and its JSON spec.

    ``convs`` is a list of conv (or linear) names or ``"all"`` (see :func:`eligible_convs`);
    ``k`` and ``cp`` are one value for every layer or a mapping name → value. ``model`` is
    copied unless ``copy=False``. Each layer's k-means uses ``seed``.
    """
    names = eligible_convs(model) if convs == "all" else list(convs)
    spec: Spec = {}
    for name in names:
        layer = _dense_layer(model, name)
        spec[name] = self_group_entry(layer, _per_conv(k, name, "k"), _per_conv(cp, name, "cp"),
                                      seed, restarts)
    return apply_self_grouping(model, spec, copy=copy), spec


def _dense_layer(model: nn.Module, name: str) -> nn.Conv2d | nn.Linear:
    """The dense conv or linear ``name`` of ``model``; ModelError if absent or not dense."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"self-grouping names {name!r}, which the model lacks") from None
    if type(layer) not in Dense or getattr(layer, "groups", 1) != 1:
        raise ModelError(f"{name}: self-grouping needs a dense nn.Conv2d (groups=1) or nn.Linear, got "
                         f"{type(layer).__name__}")
    return layer


def apply_self_grouping(model: nn.Module, spec: Mapping[str, Mapping], copy: bool = True) -> nn.Module:
    """``model`` with each layer named in ``spec`` replaced by its diverse group layer.

    Weights are taken from the dense layers, so applying a spec to a freshly (pruned and)
    built model and then loading the grouped state_dict restores the grouped model.
    ``model`` is copied unless ``copy=False``. ModelError if the spec does not fit.
    """
    out = _copy.deepcopy(model) if copy else model
    for name, entry in spec.items():
        layer = _dense_layer(out, name)
        groups = [int(g) for g in entry["groups"]]
        inputs = [[int(j) for j in s] for s in entry["inputs"]]
        try:
            grouped = group_layer(layer, groups, inputs)
        except ModelError as exc:
            raise ModelError(f"{name}: {exc}") from None
        _set_submodule(out, name, grouped)
    return out


# --------------------------------------------------------------------------- cost


class CostDelta(NamedTuple):
    """FLOPs (multiply-adds) and params self-grouping removes."""

    flops: int
    params: int


def _sizes(entry: Mapping) -> list[tuple[int, int]]:
    """(|G_g|, |S_g|) per group."""
    counts = np.bincount(np.asarray(entry["groups"], dtype=int), minlength=len(entry["inputs"]))
    return [(int(c), len(s)) for c, s in zip(counts, entry["inputs"])]


def connections(entry: Mapping) -> int:
    """``Σ_g |S_g|·|G_g|``: the (input, output) pairs a grouped layer keeps."""
    return sum(g * s for g, s in _sizes(entry))


def grouped_flops(entry: Mapping, out_hw, k_hw) -> int:
    """``Σ_g |S_g|·|G_g|·kh·kw·H·W``: multiply-adds of one image through the grouped conv."""
    (h, w), (kh, kw) = pair(out_hw), pair(k_hw)
    return connections(entry) * kh * kw * h * w


def grouped_params(entry: Mapping, k_hw, bias: bool = False) -> int:
    """``Σ_g |S_g|·|G_g|·kh·kw`` weights, plus one bias per filter with ``bias``."""
    kh, kw = pair(k_hw)
    return connections(entry) * kh * kw + (len(entry["groups"]) if bias else 0)


class LayerCost(NamedTuple):
    """What one (input, output) connection of a layer costs for an example input, and how
    many connections the dense layer has."""

    flops: int
    params: int
    dense: int


def connection_costs(model: nn.Module, names: Iterable[str], example_input) -> dict[str, LayerCost]:
    """Per layer ``name``: FLOPs and params of one connection for ``example_input`` (whole
    batch, as fvcore counts: a conv ``kh·kw·H·W`` per image, a linear one per output row)
    and the dense connection count ``in·out``. One hooked forward pass; the layers may be
    dense or already grouped."""
    mods = {}
    for name in names:
        m = model.get_submodule(name)
        if not isinstance(m, (*Dense, DiverseGroupLayer)):
            raise ModelError(f"{name}: not a conv or linear ({type(m).__name__})")
        mods[name] = m
    shapes: dict[str, tuple] = {}

    def note(name):
        def hook(module, inputs, output):  # returns None: the output is left alone
            shapes.setdefault(name, tuple(output.shape))
        return hook

    forward_with_hooks(model, example_input, {m: note(n) for n, m in mods.items()})
    out = {}
    for name, m in mods.items():
        if name not in shapes:
            raise ModelError(f"{name} is not called in the forward pass; cannot cost it")
        if isinstance(m, (nn.Linear, DiverseGroupLinear)):
            n_out, n_in, kernel = m.out_features, m.in_features, 1
            positions = math.prod(shapes[name]) // n_out
        else:
            n_out, n_in, kernel = m.out_channels, m.in_channels, m.kernel_size[0] * m.kernel_size[1]
            batch, _, h, w = shapes[name]
            positions = batch * h * w
        out[name] = LayerCost(kernel * positions, kernel, n_out * n_in)
    return out


def selfgroup_cost_delta(model: nn.Module, spec: Mapping[str, Mapping], example_input) -> CostDelta:
    """FLOPs and params ``spec`` saves on ``model`` for ``example_input`` (whole batch,
    as fvcore counts it): dense ``out·in·kh·kw·H·W`` minus grouped per layer.

    ``model`` is the dense (e.g. channel-pruned) model the spec was computed on; one
    hooked forward pass gives each layer's output size. A model already grouped with
    ``spec`` gives the same answer.
    """
    costs = connection_costs(model, spec, example_input)
    saved = {name: costs[name].dense - connections(entry) for name, entry in spec.items()}
    return CostDelta(int(sum(saved[n] * costs[n].flops for n in spec)),
                     int(sum(saved[n] * costs[n].params for n in spec)))


# --------------------------------------------------------------------------- budget


class SelfGroupFit(NamedTuple):
    """A spec meeting a budget: the ``cp`` it was cut at and the ``cost`` (FLOPs or params)
    of the self-grouped model."""

    spec: Spec
    cp: float
    cost: int


def fit_cp(model: nn.Module, names: Iterable[str], kind: str, target: int, base: int,
           example_input, k: int = 16, seed: int = 0, restarts: int = 5,
           iterations: int = 60) -> SelfGroupFit:
    """The smallest ``cp`` whose self-grouping of ``names`` leaves at most ``target``
    ``kind`` (``"flops"`` or ``"params"``) of ``model``, whose dense count is ``base``.

    Each layer is clustered once (``min(k, out)`` groups); the cost of a ``cp`` is then
    exact arithmetic (``base`` less each layer's removed connections times their cost,
    :func:`connection_costs`). The cost never increases with ``cp`` (every ``S_g`` only
    shrinks), so bisection over ``iterations`` halvings lands on the step just at or below
    the target: one more connection would exceed it. BudgetError if even ``cp = 1`` (one
    input per group) leaves more than ``target``.
    """
    names = list(names)
    costs = connection_costs(model, names, example_input)
    clusters = {n: cluster_filters(_dense_layer(model, n), k, seed, restarts) for n in names}
    per = {n: getattr(costs[n], kind) for n in names}

    def at(cp: float) -> tuple[int, Spec]:
        spec = {n: clusters[n].entry(cp) for n in names}
        return int(base - sum((costs[n].dense - connections(spec[n])) * per[n] for n in names)), spec

    cost, spec = at(0.0)
    if cost <= target:
        return SelfGroupFit(spec, 0.0, cost)
    cost, spec = at(1.0)
    if cost > target:
        least = math.ceil(10000 * cost / base) / 100
        raise BudgetError(f"self-grouping alone cannot bring {kind} to {target}: with one input per "
                          f"filter group {cost} ({cost / base:.2%} of {base}) remain; use at least "
                          f"{kind}<={least:.2f}%")
    lo, hi = 0.0, 1.0
    for _ in range(int(iterations)):
        mid = (lo + hi) / 2
        c, s = at(mid)
        if c <= target:
            hi, cost, spec = mid, c, s
        else:
            lo = mid
    return SelfGroupFit(spec, hi, cost)


__all__ = [
    "Clustering", "CostDelta", "DiverseGroupConv", "DiverseGroupLinear", "LayerCost", "SelfGroupFit",
    "apply_self_grouping", "cluster_filters", "connection_costs", "connection_threshold", "connections",
    "eligible_convs", "eligible_layers", "eligible_linears", "fit_cp", "group_inputs", "group_layer",
    "grouped_flops", "grouped_params", "importance_vectors", "self_group", "self_group_entry",
    "self_group_model", "selfgroup_cost_delta",
]
