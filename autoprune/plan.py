"""Plan: which channels each unit keeps; applying, saving and loading it.

A Plan is the one currency of autoprune: greedy, uniform and search all produce
one. ``apply`` removes the other channels physically with Torch-Pruning, so the
result is a smaller ordinary module, not a masked one.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import models
from .checkpoint import atomic_save, load_weights, read_checkpoint
from .errors import CheckpointError, ModelError, OptionError
from .selfgroup import apply_self_grouping
from .criteria.magnitude import filter_norms
from .space import Space, Unit, build_graph

FORMAT = "autoprune-plan/1"


@dataclass
class Plan:
    """Per unit, the sorted indices of the channels kept (units absent are kept whole).

    ``selfgroup`` optionally turns convs of the pruned model into SG-CNN diverse
    group convolutions (conv name → filter groups and their input sets), applied
    after channel pruning.
    """

    keep: dict[str, list[int]]
    widths: dict[str, int]
    input_shape: tuple[int, ...]
    meta: dict = field(default_factory=dict)
    selfgroup: dict = field(default_factory=dict)

    def kept_widths(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.keep.items()}

    def apply(self, model: nn.Module) -> nn.Module:
        """A physically pruned copy of ``model`` (which is left untouched)."""
        pruned = copy.deepcopy(model)
        graph = build_graph(pruned, torch.zeros(self.input_shape))
        for name, keep in self.keep.items():
            root = pruned.get_submodule(name)
            drop = sorted(set(range(self.widths[name])) - set(keep))
            if drop:
                pruner = graph.get_pruner_of_module(root)
                graph.get_pruning_group(root, pruner.prune_out_channels, drop).prune()
        if self.selfgroup:
            pruned = apply_self_grouping(pruned, self.selfgroup, copy=False)
        return pruned

    def to_dict(self) -> dict:
        return {"format": FORMAT, "input_shape": list(self.input_shape), "widths": self.widths,
                "keep": self.keep, "meta": self.meta, "selfgroup": self.selfgroup}

    def to_json(self, indent: int = 1) -> str:
        """Human-readable JSON: per unit the original width, kept count and indices."""
        units = {n: {"width": self.widths[n], "kept": len(k), "keep": k} for n, k in self.keep.items()}
        return json.dumps({"format": FORMAT, "input_shape": list(self.input_shape),
                           "units": units, "meta": self.meta, "selfgroup": self.selfgroup},
                          indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping) -> "Plan":
        return cls({k: list(map(int, v)) for k, v in d["keep"].items()},
                   {k: int(v) for k, v in d["widths"].items()},
                   tuple(d["input_shape"]), dict(d.get("meta", {})), dict(d.get("selfgroup", {})))

    def save(self, path: str | os.PathLike, pruned: nn.Module) -> None:
        """Write the plan, the architecture and ``pruned``'s weights to one file, atomically."""
        arch = getattr(pruned, "autoprune_arch", None)
        atomic_save({"plan": self.to_dict(), "arch": arch, "state_dict": pruned.state_dict()}, path)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a pruned model saved by :meth:`Plan.save` (weights loaded with weights_only).

    The unpruned architecture comes from ``model`` if given, else from the registry
    name stored in the file.
    """
    data = read_checkpoint(path)
    if "plan" not in data:
        raise CheckpointError(f"{path} holds no pruning plan; it is a baseline checkpoint "
                              "(load it with autoprune.checkpoint.load_baseline)")
    if model is None:
        if not data.get("arch"):
            raise CheckpointError(f"{path} names no registry architecture; pass model=")
        model = models.create(**data["arch"])
    plan = Plan.from_dict(data["plan"])
    try:
        pruned = plan.apply(model)
    except (KeyError, AttributeError, IndexError, ModelError) as exc:
        raise CheckpointError(f"plan in {path} does not fit {type(model).__name__}: {exc}") from exc
    return load_weights(pruned, data["state_dict"], path).eval()


def _top(scores: np.ndarray, n: int) -> list[int]:
    """Indices of the ``n`` highest scores (ties broken by lower index)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return sorted(order[:n].tolist())


def _proportional(labels: np.ndarray, kept: int) -> dict[int, int]:
    """Channels to keep per cluster: largest-remainder shares of ``kept`` by cluster size,
    every cluster at least one where ``kept`` allows."""
    ids, sizes = np.unique(labels, return_counts=True)
    quota = kept * sizes / sizes.sum()
    base = np.minimum(sizes, 1 if kept >= len(ids) else 0)
    alloc = np.clip(np.floor(quota).astype(int), base, sizes)
    while alloc.sum() < kept:
        alloc[np.argmax(np.where(alloc < sizes, quota - alloc, -np.inf))] += 1
    while alloc.sum() > kept:
        alloc[np.argmax(np.where(alloc > base, alloc - quota, -np.inf))] -= 1
    return dict(zip(ids.tolist(), alloc.tolist()))


def _select_local(scores: np.ndarray, kept: int, labels: np.ndarray | None) -> list[int]:
    """The ``kept`` highest scores, per cluster in proportion when ``labels`` are given."""
    if labels is None:
        return _top(scores, kept)
    keep: list[int] = []
    for cluster, n in _proportional(labels, kept).items():
        members = np.flatnonzero(labels == cluster)
        keep += members[_top(scores[members], n)].tolist()
    return sorted(keep)


def kept_channels(unit: Unit, scores, width: int, clusters=None) -> list[int]:
    """The sorted indices of the ``width`` channels ``unit`` keeps: the highest ``scores``
    (ties: the lower index), with ``clusters`` (labels [unit.width]) each cluster in
    proportion to its size, at least one where ``width`` allows; grouped units keep the same
    local indices in every group, ranked by their mean score over the groups.

    The one selection rule: :func:`select` builds Plans with it and the greedy
    (:mod:`autoprune.greedy`) masks its candidates with it, so a masked candidate is
    exactly the network ``select`` produces at those widths.
    """
    s = np.asarray(torch.as_tensor(scores).double().cpu())
    labels = None if clusters is None else np.asarray(clusters)
    if unit.groups == 1:
        return _select_local(s, width, labels)
    size = unit.width // unit.groups
    local = s.reshape(unit.groups, size).mean(0)
    lab = None if labels is None else labels.reshape(unit.groups, size)[0]
    chosen = _select_local(local, width // unit.groups, lab)
    return sorted(g * size + i for g in range(unit.groups) for i in chosen)


def select(space: Space, widths: Mapping[str, int], scores: Mapping[str, torch.Tensor] | None = None,
           clusters: Mapping[str, np.ndarray] | None = None) -> Plan:
    """The Plan keeping, per unit, ``widths[unit]`` highest-scoring channels.

    ``scores`` (unit → Tensor[width], higher = keep) default to the L1 magnitude of
    the unit's filters in the space's model. With ``clusters`` (unit → labels) each cluster
    keeps channels in proportion to its size, at least one where the width allows
    (per unit: :func:`kept_channels`).
    """
    full = space.complete(widths)
    scores = filter_norms(space, 1) if scores is None else scores
    keep = {}
    for unit in space.units:
        if full[unit.name] == unit.width:
            continue
        if not unit.allowed(full[unit.name]):
            raise OptionError(f"unit {unit.name}: width {full[unit.name]} is not a multiple of "
                             f"{unit.step} in {unit.min_width}..{unit.width}")
        labels = None if clusters is None else clusters.get(unit.name)
        keep[unit.name] = kept_channels(unit, scores[unit.name], full[unit.name], labels)
    return Plan(keep, {u.name: u.width for u in space.units if u.name in keep}, space.input_shape)


__all__ = ["Plan", "kept_channels", "select", "load"]
