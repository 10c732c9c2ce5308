"""Exact analytic FLOPs/params of a width vector, from one fvcore measurement.

Every layer's cost is measured once with fvcore (multiply-adds). Pruning scales a
layer's input and output channels by the kept fractions ``r`` of the units they
belong to, so a conv/linear costs ``F·p(r)·q(r)`` and a channel-wise layer (BN,
depthwise conv, pooling) ``F·q(r)``, with ``p``/``q`` affine in ``r``. Summed over
layers the total is a quadratic form ``zᵀQz`` with ``z = [1, r_1..r_n]``: a few
microseconds per evaluation, equal to fvcore's count on the pruned network.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from typing import Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from .layers import ROOT_TYPES, as_input_tuple

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d)

# fvcore operator name → fragments of the autograd node names Torch-Pruning records
# for the same operation when it is called functionally (outside a leaf module).
_OP_GRAD_FNS = {
    "adaptive_avg_pool2d": ("AdaptiveAvgPool", "Mean"),
    "upsample_nearest2d": ("UpsampleNearest",),
    "upsample_bilinear2d": ("UpsampleBilinear",),
    "batch_norm": ("BatchNorm",),
    "layer_norm": ("LayerNorm",),
    "group_norm": ("GroupNorm",),
    "linear": ("Addmm", "Mm", "Linear"),
}


class Cost(NamedTuple):
    """FLOPs (multiply-adds) and parameter count of a structure."""

    flops: int
    params: int


def fvcore_cost(model: nn.Module, example_input: torch.Tensor | tuple) -> Cost:
    """fvcore's own count of ``model`` (the reference the analytic model must equal)."""
    analysis = _analysis(model, example_input)
    from fvcore.nn import parameter_count
    return Cost(int(analysis.total()), int(parameter_count(model)[""]))


def _analysis(model: nn.Module, example_input):
    from fvcore.nn import FlopCountAnalysis
    was_training = model.training
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(model, as_input_tuple(example_input))
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        analysis.total()
    model.train(was_training)
    return analysis


class CostModel:
    """Quadratic forms giving FLOPs and params as functions of kept fractions."""

    def __init__(self, unit_names: list[str], widths: np.ndarray, q_flops: np.ndarray,
                 q_params: np.ndarray) -> None:
        self.index = {n: i + 1 for i, n in enumerate(unit_names)}
        self.widths = widths
        self.q_flops = q_flops
        self.q_params = q_params

    def z(self, widths: Mapping[str, int]) -> np.ndarray:
        """The vector ``[1, r_1..r_n]`` of kept fractions."""
        z = np.ones(len(self.index) + 1)
        for name, kept in widths.items():
            i = self.index[name]
            z[i] = kept / self.widths[i - 1]
        return z

    def __call__(self, widths: Mapping[str, int]) -> Cost:
        z = self.z(widths)
        return Cost(int(round(z @ self.q_flops @ z)), int(round(z @ self.q_params @ z)))

    @classmethod
    def measure(cls, model: nn.Module, example_input, space, graph) -> "CostModel":
        """Measure every layer once with fvcore and assemble the quadratic forms of ``space``'s
        units (a :class:`~autoprune.space.Space` being built from the dependency ``graph``)."""
        builder = _Builder(space, graph)
        analysis = _analysis(model, example_input)
        by_module = analysis.by_module()
        leaves = {n: m for n, m in model.named_modules() if not list(m.children())}
        for name, module in leaves.items():
            builder.add_module(name, module, by_module.get(name, 0), _own_params(module))
        builder.add_residual_flops(_residual_flops(model, analysis.by_module_and_operator()))
        builder.add_unwrapped_params(model)
        widths = np.array([u.width for u in space.units], dtype=float)
        return cls(space.unit_names, widths, builder.q_flops, builder.q_params)


def _own_params(module: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters(recurse=False)}


def _residual_flops(model: nn.Module, by_mod_op: dict) -> dict[str, int]:
    """FLOPs fvcore counts in a module's own code (functional calls), per operator."""
    residual: dict[str, int] = defaultdict(int)
    for name, module in model.named_modules():
        if not list(module.children()):
            continue
        own = dict(by_mod_op.get(name, {}))
        for child, _ in module.named_children():
            for op, flops in by_mod_op.get(f"{name}.{child}" if name else child, {}).items():
                own[op] = own.get(op, 0) - flops
        for op, flops in own.items():
            if flops:
                residual[op] += flops
    return dict(residual)


class _Builder:
    """Accumulates each layer's contribution to the FLOPs and params quadratic forms."""

    def __init__(self, space, graph) -> None:
        self.space = space
        self.graph = graph
        self.index = {u.name: i + 1 for i, u in enumerate(space.units)}
        self.width = {u.name: u.width for u in space.units}
        claimed = {node.grad_fn: node.module for node in graph.module2node.values()}
        self.node_of_leaf = {name: (claimed[fn], channels)
                             for fn, (name, channels) in graph.leaf_outputs.items() if fn in claimed}
        n = len(space.units) + 1
        self.q_flops = np.zeros((n, n))
        self.q_params = np.zeros((n, n))

    def vector(self, node, side: str, total: int | None) -> np.ndarray:
        """Affine kept fraction of a node's channels on ``side`` as a vector over z."""
        v = np.zeros(len(self.index) + 1)
        counts = self.space.maps.get((node, side), {})
        total = total or sum(counts.values())
        if not counts or not total:
            v[0] = 1.0
            return v
        for unit, n in counts.items():
            v[self.index[unit]] = n / total
        v[0] = (total - sum(counts.values())) / total
        return v

    def add(self, which: np.ndarray, amount: float, p: np.ndarray, q: np.ndarray) -> None:
        which += amount * np.outer(p, q)

    def add_module(self, name: str, module: nn.Module, flops: int, params: dict[str, int]) -> None:
        e0 = self.vector(None, "", None)
        if isinstance(module, CONV_TYPES) and module.groups == module.in_channels > 1:
            c = self.vector(module, "out", module.out_channels)
            self.add(self.q_flops, flops, e0, c)
            self.add(self.q_params, sum(params.values()), e0, c)
        elif isinstance(module, CONV_TYPES + (nn.Linear,)):
            p = self.vector(module, "in", _in_channels(module))
            q = self.vector(module, "out", _out_channels(module))
            self.add(self.q_flops, flops, p, q)
            self.add(self.q_params, params.get("weight", 0), p, q)
            self.add(self.q_params, params.get("bias", 0), e0, q)
        else:
            c = self._channelwise_vector(name, module)
            self.add(self.q_flops, flops, e0, c)
            self.add(self.q_params, sum(params.values()), e0, c)

    def _channelwise_vector(self, name: str, module: nn.Module) -> np.ndarray:
        """Kept fraction of a channel-wise layer: from its own graph node, else from the
        anonymous op node its output came from (pooling, activations)."""
        for side in ("out", "in"):
            if (module, side) in self.space.maps:
                return self.vector(module, side, _channels(module))
        node, channels = self.node_of_leaf.get(name, (None, None))
        return self.vector(node, "out", channels)

    def add_residual_flops(self, residual: dict[str, int]) -> None:
        """Attribute functional-call FLOPs to the graph's op nodes of the same kind."""
        for op, flops in residual.items():
            nodes = self._op_nodes(op)
            if not nodes:
                log.warning("cost model: %d FLOPs of functional %s kept fixed (no matching "
                            "graph node); analytic cost may deviate", flops, op)
                nodes = [None]
            vectors = [self.vector(n, "out", None) for n in nodes]
            sizes = [max(1, sum(self.space.maps.get((n, "out"), {}).values())) for n in nodes]
            for v, size in zip(vectors, sizes):
                self.add(self.q_flops, flops * size / sum(sizes), self.vector(None, "", None), v)

    def _op_nodes(self, op: str) -> list:
        fragments = next((f for key, f in _OP_GRAD_FNS.items() if op.startswith(key)), ())
        claimed = {id(node) for node, _ in self.node_of_leaf.values()}
        nodes = []
        for module in self.graph.module2node:
            if id(module) in claimed:
                continue
            grad_fn = getattr(module, "_grad_fn", None)
            if grad_fn is not None and any(f in str(grad_fn) for f in fragments):
                nodes.append(module)
        return nodes

    def add_unwrapped_params(self, model: nn.Module) -> None:
        """Parameters owned directly by non-leaf modules (e.g. ConvNeXt layer scales)."""
        e0 = self.vector(None, "", None)
        for module in model.modules():
            if not list(module.children()):
                continue
            for p in module.parameters(recurse=False):
                self.add(self.q_params, p.numel(), e0, self.vector(p, "out", None))


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _channels(module: nn.Module) -> int | None:
    """Channel count of a channel-wise layer, where its type tells it."""
    for attr in ("num_features", "num_channels"):
        if hasattr(module, attr):
            return int(getattr(module, attr))
    shape = getattr(module, "normalized_shape", None)
    return int(shape[0]) if shape else None


__all__ = ["Cost", "CostModel", "fvcore_cost", "ROOT_TYPES"]
