"""The Plan a peer's pruned copy of a model is, recovered by matching its weights.

A peer (ModelOpt's FastNAS) hands back a physically smaller copy whose channels may be
reordered (FastNAS sorts them by importance before cutting). Each of its layers holds a slice
of the dense layer's weights, so unit by unit, in an order where a layer's input channels are
already known, every kept output row of the unit's producing layers (its convs/linears, with
their bias, and its norms' affine parameters) is matched against the dense rows restricted to
those inputs: the unit keeps the dense channels all its layers agree on. A structure that is
no Plan over autoprune's units (layers of one unit keeping different channels; a layer cut
along a dimension no unit covers) is refused with a ModelError naming the layer.
:func:`check_reproduces` confirms that the Plan applied to the dense model computes what the
peer's copy computes.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from ..errors import ModelError
from ..layers import BATCH_NORM_TYPES
from ..plan import Plan
from ..space import Space, Unit

__all__ = ["check_reproduces", "recover_plan"]

NOT_A_PLAN = "not a Plan over autoprune's units"


def recover_plan(space: Space, dense: nn.Module, pruned: nn.Module, peer: str = "the peer") -> Plan:
    """The Plan whose :meth:`~autoprune.plan.Plan.apply` on ``dense`` gives ``pruned``'s
    structure and weights (up to the order of channels); ``peer`` names it in errors."""
    layers = _Layers(dense, pruned, peer)
    reads = _reads(space)
    order: dict[str, list[int]] = {}  # unit → the dense channel at each of the copy's positions
    pending = list(space.units)
    while pending:
        ready = [(unit, rows) for unit in pending
                 if (rows := _candidates(unit, reads, order, layers)) is not None]
        if not ready:
            raise ModelError(f"cannot recover the channels {peer} kept in unit {pending[0].name}: every "
                             "layer of it reads channels of a unit not recovered yet")
        for unit, rows in ready:
            order[unit.name] = _assign(unit, rows, peer)
            pending.remove(unit)
    for unit in space.units:  # every layer checked, now that all inputs are known (residual sums)
        rows = _candidates(unit, reads, order, layers)
        if not bool(rows[torch.arange(len(rows)), order[unit.name]].all()):
            order[unit.name] = _assign(unit, rows, peer)
    keep = {u.name: sorted(order[u.name]) for u in space.units if len(order[u.name]) < u.width}
    return Plan(keep, {name: space.unit(name).width for name in keep}, space.input_shape)


def check_reproduces(plan: Plan, dense: nn.Module, pruned: nn.Module, images: torch.Tensor,
                     peer: str = "the peer") -> None:
    """ModelError unless ``plan.apply(dense)`` has every layer's shape of ``pruned`` and the
    same outputs on ``images`` (BN on batch statistics: the peer may have re-estimated its
    running statistics; weights decide the outputs)."""
    small = plan.apply(dense)
    ours = dict(small.named_modules())
    for name, module in pruned.named_modules():
        weight = getattr(module, "weight", None)
        mine = getattr(ours.get(name), "weight", None)
        if isinstance(weight, torch.Tensor) and isinstance(mine, torch.Tensor) and mine.shape != weight.shape:
            raise ModelError(f"{peer} cut layer {name} to {tuple(weight.shape)}, the recovered Plan to "
                             f"{tuple(mine.shape)}: its structure is {NOT_A_PLAN}")
    expected, got = _batch_statistics_forward(pruned, images), _batch_statistics_forward(small, images)
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if expected.shape != got.shape or not torch.allclose(got, expected, rtol=1e-4, atol=tolerance):
        gap = float((got - expected).abs().max()) if got.shape == expected.shape else float("nan")
        raise ModelError(f"the Plan recovered from {peer}'s network does not reproduce its outputs "
                         f"(largest difference {gap:.3g}): channels of equal weights may be ambiguous")


def _batch_statistics_forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model``'s outputs with its BN layers normalising by batch statistics (on a copy)."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, BATCH_NORM_TYPES):
            module.train()
    with torch.no_grad():
        return model(images).float()


class _Layers:
    """The dense and the pruned module of each name (the same type, or ModelError)."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, peer: str) -> None:
        self.dense, self.pruned, self.peer = dict(dense.named_modules()), dict(pruned.named_modules()), peer

    def pair(self, name: str) -> tuple[nn.Module, nn.Module]:
        d, p = self.dense[name], self.pruned.get(name)
        if not isinstance(p, type(d)):
            raise ModelError(f"{self.peer}'s network has no {type(d).__name__} {name} "
                             f"(found {type(p).__name__}): its structure is {NOT_A_PLAN}")
        return d, p


def _reads(space: Space) -> dict[str, list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """Per layer, the units it reads: (unit, its input positions, the unit channel of each)."""
    reads = defaultdict(list)
    for unit in space.units:
        for layer, positions, channels in unit.consumers:
            reads[layer].append((unit.name, positions, channels))
    return reads


def _inputs(name: str, d: nn.Module, p: nn.Module, reads, order, unit: Unit, peer: str) -> list[int] | None:
    """The dense input position of each of the copy's input positions of layer ``name`` (None
    while a unit it reads is not recovered yet). A run of positions of one unit becomes that
    unit's kept channels in the copy's order; positions of no unit stay (the image)."""
    groups = getattr(d, "groups", 1)
    if groups > 1:
        if groups == d.in_channels == d.out_channels:  # depthwise: a row reads its own channel only
            return list(range(d.weight.shape[1]))
        raise ModelError(f"layer {name} is a grouped convolution: recovering {peer}'s channels "
                         "supports plain and depthwise convolutions only")
    owner: list[tuple[str, int] | None] = [None] * d.weight.shape[1]
    for source, positions, channels in reads.get(name, ()):
        for position, channel in zip(positions, channels):
            owner[position] = (source, channel)
    if any(o is not None and o[0] not in order for o in owner):
        return None
    columns: list[int] = []
    i = 0
    while i < len(owner):
        if owner[i] is None:
            columns.append(i)
            i += 1
            continue
        source, of_channel = owner[i][0], defaultdict(list)
        while i < len(owner) and owner[i] is not None and owner[i][0] == source:
            of_channel[owner[i][1]].append(i)
            i += 1
        for channel in order[source]:
            columns += of_channel.get(channel, [])
    if len(columns) != p.weight.shape[1]:
        raise ModelError(f"{peer}'s layer {name} reads {p.weight.shape[1]} input channels where the units "
                         f"it reads keep {len(columns)} (unit {unit.name}): its structure is {NOT_A_PLAN}")
    return columns


def _rows(module: nn.Module, columns: list[int] | None = None) -> torch.Tensor:
    """A layer's output rows as vectors: weight (its kept ``columns``) and bias, in float64."""
    weight = module.weight.detach()
    if columns is not None:
        weight = weight[:, columns]
    parts = [weight.reshape(len(weight), -1)]
    if getattr(module, "bias", None) is not None:
        parts.append(module.bias.detach().reshape(-1, 1))
    return torch.cat(parts, 1).double().cpu()


def _matches(rows: torch.Tensor, dense_rows: torch.Tensor) -> torch.Tensor:
    """[kept, width] booleans: which dense rows equal each kept row (to float rounding)."""
    distance = torch.cdist(rows, dense_rows, compute_mode="donot_use_mm_for_euclid_dist")
    scale = torch.maximum(rows.norm(dim=1)[:, None], dense_rows.norm(dim=1)[None, :])
    return distance <= 1e-6 * scale + 1e-12


def _candidates(unit: Unit, reads, order, layers: _Layers) -> torch.Tensor | None:
    """[kept, width] booleans: the dense channels each of the copy's channels of ``unit`` may be,
    agreed by every producing layer whose inputs are known and every affine norm (None if no
    producing layer's inputs are known yet); ModelError naming the layer where they disagree."""
    peer, agreed, first = layers.peer, None, None
    for name in unit.modules:
        d, p = layers.pair(name)
        columns = _inputs(name, d, p, reads, order, unit, peer)
        if columns is None:
            continue
        agreed, first = _agree(agreed, _matches(_rows(p), _rows(d, columns)), name, first, unit, peer)
    if agreed is None:
        return None
    for name in unit.norms:
        d, p = layers.pair(name)
        if getattr(d, "weight", None) is not None and d.weight.dim() == 1:
            agreed, first = _agree(agreed, _matches(_affine(p), _affine(d)), name, first, unit, peer)
    return agreed


def _affine(norm: nn.Module) -> torch.Tensor:
    """A norm layer's per-channel (weight, bias) rows, in float64."""
    parts = [norm.weight.detach()] + ([norm.bias.detach()] if norm.bias is not None else [])
    return torch.stack(parts, 1).double().cpu()


def _agree(agreed: torch.Tensor | None, matches: torch.Tensor, name: str, first: str | None,
           unit: Unit, peer: str) -> tuple[torch.Tensor, str]:
    """``agreed`` narrowed by one layer's ``matches``; ModelError naming the layer if it keeps
    a different number of channels or one no dense channel fits consistently."""
    if agreed is not None and matches.shape[0] != agreed.shape[0]:
        raise ModelError(f"{peer} kept {matches.shape[0]} channels in layer {name} but {agreed.shape[0]} in "
                         f"{first}, both of unit {unit.name}: its structure is {NOT_A_PLAN}")
    narrowed = matches if agreed is None else agreed & matches
    lost = (~narrowed.any(1)).nonzero().flatten().tolist()
    if lost:
        where = "no channel of the dense layer" if agreed is None else f"no dense channel that {first} keeps"
        raise ModelError(f"{peer}'s layer {name} keeps a channel (position {lost[0]}) matching {where} "
                         f"(unit {unit.name}): its structure is {NOT_A_PLAN}")
    return narrowed, first or name


def _assign(unit: Unit, candidates: torch.Tensor, peer: str) -> list[int]:
    """One distinct dense channel per kept channel (the most constrained first; channels that
    still tie have equal weights in every producing layer)."""
    chosen: list[int] = [-1] * candidates.shape[0]
    used: set[int] = set()
    for j in sorted(range(candidates.shape[0]), key=lambda j: int(candidates[j].sum())):
        free = [i for i in candidates[j].nonzero().flatten().tolist() if i not in used]
        if not free:
            raise ModelError(f"{peer} kept two channels of unit {unit.name} (layer {unit.modules[0]}) that "
                             f"match the same dense channel: its structure is {NOT_A_PLAN}")
        chosen[j] = free[0]
        used.add(free[0])
    return chosen
