"""SG-CNN self-grouping: diverse group convolution (Guo et al., Neural Networks 2020).

A dense ``nn.Conv2d`` is split into groups of filters that each read their own
subset of the input channels:

1. importance vector of filter ``i``: ``v_i[j] = Σ_hw |W[i, j, h, w]|``;
2. k-means over the filters' importance vectors → groups ``G_g``, centroids ``c_g``;
3. threshold ``τ`` = the ``cp``-th percentile (``cp`` a fraction) of all centroid
   entries, centroid ``g`` counted once per member (``|G_g|`` times);
4. group ``g`` keeps the inputs ``S_g = {j : c_g[j] > τ}`` (its argmax if none passes).

:class:`DiverseGroupConv` runs the result as a real smaller computation: per group
the input channels ``S_g`` are gathered and one ``F.conv2d`` with that group's weight
slice ``[|G_g|, |S_g|, kh, kw]`` runs; outputs are concatenated and put back in the
original filter order. FLOPs are ``Σ_g |S_g|·|G_g|·kh·kw·H·W`` per image, which is
exactly what fvcore counts when it traces the module.

A *spec* describes the grouping of a model and is plain JSON::

    {conv_name: {"groups": [group of filter 0, group of filter 1, ...],
                 "inputs": [[sorted kept inputs of group 0], [... group 1], ...]}}

Self-grouping is applied *after* channel pruning: conv names and channel indices
refer to the (pruned) model the spec was computed on. ``apply_self_grouping`` re-applies
a stored spec, so a Plan holding one can rebuild the grouped model on load.
"""

from __future__ import annotations

import copy as _copy
from typing import Iterable, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError, OptionError, short
from .grouping import kmeans
from .space import forward_with_hooks

Spec = dict  # {conv_name: {"groups": list[int], "inputs": list[list[int]]}}


# --------------------------------------------------------------------------- module


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_entry(groups: list[int], inputs: list[list[int]], in_channels: int,
                 out_channels: int, where: str = "") -> None:
    """ModelError unless ``groups``/``inputs`` describe a valid grouping of the conv."""
    at = f"{where}: " if where else ""
    if len(groups) != out_channels:
        raise ModelError(f"{at}self-grouping lists {len(groups)} filters but the conv has "
                         f"{out_channels} output channels")
    n = len(inputs)
    if n == 0:
        raise ModelError(f"{at}self-grouping has no groups")
    bad = [g for g in groups if not 0 <= g < n]
    if bad:
        raise ModelError(f"{at}filter group {bad[0]} outside 0..{n - 1} "
                         f"(the spec has {n} input sets)")
    empty = sorted(set(range(n)) - set(groups))
    if empty:
        raise ModelError(f"{at}self-grouping group {empty[0]} has no filters")
    for g, s in enumerate(inputs):
        if not s:
            raise ModelError(f"{at}self-grouping group {g} reads no input channel")
        if list(s) != sorted(set(s)) or not 0 <= s[0] <= s[-1] < in_channels:
            raise ModelError(f"{at}self-grouping group {g}: inputs must be sorted distinct "
                             f"indices in 0..{in_channels - 1}")


class DiverseGroupConv(nn.Module):
    """A conv whose filter groups each read their own subset of input channels.

    ``groups[i]`` is the group of filter ``i`` (original filter order) and
    ``inputs[g]`` the sorted input channels group ``g`` reads. Parameters are
    ``weight_{g}`` (``[|G_g|, |S_g|, kh, kw]``, rows in increasing filter order) and,
    with ``bias``, ``bias_{g}``; the index tensors are non-persistent buffers (the spec,
    not the state_dict, carries the structure). Stride, padding (including string and
    non-zero padding modes) and dilation mean what they mean for ``nn.Conv2d``.

    Build one from a dense conv with :meth:`from_conv`; the plain constructor
    initialises each group's weights the way ``nn.Conv2d`` does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, groups: Iterable[int],
                 inputs: Iterable[Iterable[int]], stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        groups = [int(g) for g in groups]
        inputs = [[int(j) for j in s] for s in inputs]
        _check_entry(groups, inputs, in_channels, out_channels)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self.group_of = groups
        self.inputs = inputs
        self.members = [[i for i, g in enumerate(groups) if g == k] for k in range(len(inputs))]
        self.num_groups = len(inputs)
        self.has_bias = bool(bias)
        # Non-zero padding modes: pad once up front, then convolve without padding
        # (what nn.Conv2d does); the dense conv's pad amounts are reproduced exactly.
        self._pad = None
        if padding_mode != "zeros":
            ref = nn.Conv2d(1, 1, self.kernel_size, stride=self.stride, padding=self.padding,
                            dilation=self.dilation, padding_mode=padding_mode, device="meta")
            self._pad = tuple(ref._reversed_padding_repeated_twice)
        kw = {"device": device, "dtype": dtype}
        kh, kk = self.kernel_size
        for g in range(self.num_groups):
            w = torch.empty(len(self.members[g]), len(inputs[g]), kh, kk, **kw)
            self.register_parameter(f"weight_{g}", nn.Parameter(w))
            if self.has_bias:
                self.register_parameter(f"bias_{g}", nn.Parameter(torch.empty(len(self.members[g]), **kw)))
            self.register_buffer(f"index_{g}", torch.tensor(inputs[g], dtype=torch.long,
                                                            device=device), persistent=False)
        perm = [i for m in self.members for i in m]
        inverse = [0] * out_channels
        for pos, i in enumerate(perm):
            inverse[i] = pos
        self.register_buffer("inverse", torch.tensor(inverse, dtype=torch.long, device=device),
                             persistent=False)
        self._full = [len(s) == in_channels for s in inputs]
        self._identity = perm == list(range(out_channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per group, the initialisation ``nn.Conv2d`` uses (Kaiming-uniform, a=√5)."""
        for g in range(self.num_groups):
            w = getattr(self, f"weight_{g}")
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
            if self.has_bias:
                fan_in = w.shape[1] * w.shape[2] * w.shape[3]
                bound = 1 / fan_in ** 0.5
                nn.init.uniform_(getattr(self, f"bias_{g}"), -bound, bound)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, groups: Iterable[int],
                  inputs: Iterable[Iterable[int]]) -> "DiverseGroupConv":
        """The grouped conv keeping ``conv``'s weights ``W[G_g][:, S_g]`` (and biases)."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ModelError(f"self-grouping needs a dense nn.Conv2d (groups=1), got "
                             f"{type(conv).__name__}" + (f" with groups={conv.groups}"
                                                         if isinstance(conv, nn.Conv2d) else ""))
        w = conv.weight
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, groups, inputs,
                  stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for g in range(new.num_groups):
                rows = torch.tensor(new.members[g], dtype=torch.long, device=w.device)
                cols = getattr(new, f"index_{g}")
                getattr(new, f"weight_{g}").copy_(w.index_select(0, rows).index_select(1, cols))
                if conv.bias is not None:
                    getattr(new, f"bias_{g}").copy_(conv.bias.index_select(0, rows))
        new.train(conv.training)
        return new

    def spec_entry(self) -> dict:
        """This module's grouping as a JSON-able spec entry."""
        return {"groups": list(self.group_of), "inputs": [list(s) for s in self.inputs]}

    def to_dense(self) -> nn.Conv2d:
        """The equivalent masked dense conv: ``W[i, j] = 0`` for ``j ∉ S_{g(i)}``."""
        ref = getattr(self, "weight_0")
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.has_bias,
                         padding_mode=self.padding_mode, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            conv.weight.zero_()
            for g in range(self.num_groups):
                rows = torch.tensor(self.members[g], dtype=torch.long, device=ref.device)
                cols = getattr(self, f"index_{g}")
                block = conv.weight[rows]
                block[:, cols] = getattr(self, f"weight_{g}")
                conv.weight[rows] = block
                if self.has_bias:
                    conv.bias[rows] = getattr(self, f"bias_{g}")
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self._pad is not None:
            x = F.pad(x, self._pad, mode=self.padding_mode)
            padding = 0
        outs = []
        for g in range(self.num_groups):
            xg = x if self._full[g] else x.index_select(1, getattr(self, f"index_{g}"))
            bias = getattr(self, f"bias_{g}") if self.has_bias else None
            outs.append(F.conv2d(xg, getattr(self, f"weight_{g}"), bias, self.stride,
                                 padding, self.dilation))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return y if self._identity else y.index_select(1, self.inverse)

    def extra_repr(self) -> str:
        kept = sum(len(s) * len(m) for s, m in zip(self.inputs, self.members))
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.num_groups}, "
                f"connections={kept}/{self.in_channels * self.out_channels}, bias={self.has_bias}")


# --------------------------------------------------------------------------- grouping


def importance_vectors(conv: nn.Conv2d) -> np.ndarray:
    """``v[i, j] = Σ_hw |W[i, j, h, w]|`` as a float64 array ``[out, in]``."""
    return conv.weight.detach().abs().sum(dim=(2, 3)).double().cpu().numpy()


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
    keeps every connection."""
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


def self_group_entry(conv: nn.Conv2d, k: int = 16, cp: float = 0.5, seed: int = 0,
                     restarts: int = 5) -> dict:
    """The spec entry SG-CNN gives ``conv``: k-means groups of filters and their inputs."""
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise ModelError(f"self-grouping needs a dense nn.Conv2d (groups=1), got {conv}")
    if int(k) < 1:
        raise OptionError(f"k (filter groups) must be an integer >= 1, got {short(k)}")
    v = importance_vectors(conv)
    labels, _ = kmeans(torch.from_numpy(v), min(int(k), conv.out_channels), seed=seed,
                       restarts=restarts)
    labels = _canonical(labels.cpu().numpy())
    n = labels.max() + 1
    sizes = np.bincount(labels, minlength=n)
    centroids = np.stack([v[labels == g].mean(0) for g in range(n)])
    return {"groups": labels.tolist(), "inputs": group_inputs(centroids, sizes, cp)}


def self_group(conv: nn.Conv2d, k: int = 16, cp: float = 0.5, seed: int = 0,
               restarts: int = 5) -> DiverseGroupConv:
    """SG-CNN's diverse group convolution replacing the dense ``conv`` (k capped at its
    output channels; ``cp`` the fraction of (member-weighted) centroid entries pruned)."""
    entry = self_group_entry(conv, k, cp, seed, restarts)
    return DiverseGroupConv.from_conv(conv, entry["groups"], entry["inputs"])


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

    ``convs`` is a list of conv names or ``"all"`` (see :func:`eligible_convs`); ``k`` and
    ``cp`` are one value for every conv or a mapping conv name → value. ``model`` is
    copied unless ``copy=False``. Each conv's k-means uses ``seed``.
    """
    names = eligible_convs(model) if convs == "all" else list(convs)
    spec: Spec = {}
    for name in names:
        conv = _dense_conv(model, name)
        spec[name] = self_group_entry(conv, _per_conv(k, name, "k"), _per_conv(cp, name, "cp"),
                                      seed, restarts)
    return apply_self_grouping(model, spec, copy=copy), spec


def _dense_conv(model: nn.Module, name: str) -> nn.Conv2d:
    """The dense conv ``name`` of ``model``; ModelError if absent or not a dense nn.Conv2d."""
    try:
        conv = model.get_submodule(name)
    except AttributeError:
        raise ModelError(f"self-grouping names {name!r}, which the model lacks") from None
    if type(conv) is not nn.Conv2d or conv.groups != 1:
        raise ModelError(f"{name}: self-grouping needs a dense nn.Conv2d (groups=1), got "
                         f"{type(conv).__name__}")
    return conv


def apply_self_grouping(model: nn.Module, spec: Mapping[str, Mapping], copy: bool = True) -> nn.Module:
    """``model`` with each conv named in ``spec`` replaced by its :class:`DiverseGroupConv`.

    Weights are taken from the dense convs, so applying a spec to a freshly (pruned and)
    built model and then loading the grouped state_dict restores the grouped model.
    ``model`` is copied unless ``copy=False``. ModelError if the spec does not fit.
    """
    out = _copy.deepcopy(model) if copy else model
    for name, entry in spec.items():
        conv = _dense_conv(out, name)
        groups = [int(g) for g in entry["groups"]]
        inputs = [[int(j) for j in s] for s in entry["inputs"]]
        _check_entry(groups, inputs, conv.in_channels, conv.out_channels, name)
        _set_submodule(out, name, DiverseGroupConv.from_conv(conv, groups, inputs))
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


def grouped_flops(entry: Mapping, out_hw, k_hw) -> int:
    """``Σ_g |S_g|·|G_g|·kh·kw·H·W``: multiply-adds of one image through the grouped conv."""
    (h, w), (kh, kw) = _pair(out_hw), _pair(k_hw)
    return sum(g * s for g, s in _sizes(entry)) * kh * kw * h * w


def grouped_params(entry: Mapping, k_hw, bias: bool = False) -> int:
    """``Σ_g |S_g|·|G_g|·kh·kw`` weights, plus one bias per filter with ``bias``."""
    kh, kw = _pair(k_hw)
    return sum(g * s for g, s in _sizes(entry)) * kh * kw + (len(entry["groups"]) if bias else 0)


def selfgroup_cost_delta(model: nn.Module, spec: Mapping[str, Mapping], example_input) -> CostDelta:
    """FLOPs and params ``spec`` saves on ``model`` for ``example_input`` (whole batch,
    as fvcore counts it): dense ``out·in·kh·kw·H·W`` minus grouped per conv.

    ``model`` is the dense (e.g. channel-pruned) model the spec was computed on; one
    hooked forward pass gives each conv's output size. A model already grouped with
    ``spec`` gives the same answer.
    """
    mods = {}
    for name in spec:
        m = model.get_submodule(name)
        if not isinstance(m, (nn.Conv2d, DiverseGroupConv)):
            raise ModelError(f"{name}: not a conv ({type(m).__name__})")
        mods[name] = m
    shapes: dict[str, tuple] = {}

    def note(name):
        def hook(module, inputs, output):  # returns None: the output is left alone
            shapes.setdefault(name, tuple(output.shape))
        return hook

    forward_with_hooks(model, example_input, {m: note(n) for n, m in mods.items()})
    dflops = dparams = 0
    for name, entry in spec.items():
        m = mods[name]
        if name not in shapes:
            raise ModelError(f"{name} is not called in the forward pass; cannot cost it")
        batch, _, h, w = shapes[name]
        dense = m.out_channels * m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        dflops += batch * (dense * h * w - grouped_flops(entry, (h, w), m.kernel_size))
        dparams += dense - grouped_params(entry, m.kernel_size)
    return CostDelta(int(dflops), int(dparams))


__all__ = [
    "CostDelta", "DiverseGroupConv", "apply_self_grouping", "connection_threshold",
    "eligible_convs", "group_inputs", "grouped_flops", "grouped_params", "importance_vectors",
    "self_group", "self_group_entry", "self_group_model", "selfgroup_cost_delta",
]
