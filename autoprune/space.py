"""Prunable units of a network, found with Torch-Pruning's DependencyGraph.

A *unit* is a set of layers sharing one channel dimension that must be pruned
together (a conv and its BN; every conv summed by a residual add; a depthwise conv
and the conv feeding it). Each unit is named after its root module: the first
conv/linear, in definition order, whose output channels the unit removes.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch_pruning as tp
from torch import nn

from .cost import CostModel
from .errors import ModelError, OptionError, short
from .layers import NORM_TYPES, ROOT_TYPES, as_input_tuple, leaf_modules


@dataclass(frozen=True)
class Unit:
    """One prunable channel dimension.

    ``width`` is the original channel count, ``min_width`` the fewest channels a
    structure may keep, and ``step`` the granularity: kept widths are multiples of
    ``step`` (channel groups of grouped convs times ``round_to``) or the full width.
    ``groups`` is the number of channel groups selection must treat alike.
    ``modules`` are the conv/linear layers whose outputs are the unit's channels,
    ``norms`` the normalisation layers on them, and ``consumers`` the conv/linear
    layers reading them: (name, input positions, unit channel of each position).
    """

    name: str
    width: int
    min_width: int
    step: int
    groups: int
    modules: tuple[str, ...]
    norms: tuple[str, ...] = ()
    consumers: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()

    def allowed(self, kept: int) -> bool:
        """Whether ``kept`` channels is a reachable width for this unit."""
        return kept == self.width or (self.min_width <= kept <= self.width and kept % self.step == 0)

    def round(self, kept: float) -> int:
        """The reachable width nearest below ``kept`` (never under ``min_width``)."""
        if kept >= self.width:
            return self.width
        return max(self.min_width, int(math.floor(kept / self.step + 1e-9)) * self.step)


def forward_with_hooks(model: nn.Module, example_input: torch.Tensor | tuple,
                       hooks: dict[nn.Module, object]) -> None:
    """One no-grad eval-mode forward pass with forward ``hooks`` attached; the model's
    train/eval mode is restored and the hooks removed afterwards."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks.items()]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(*as_input_tuple(example_input))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def output_layers(model: nn.Module, example_input: torch.Tensor | tuple) -> list[str]:
    """Names of the conv/linear layers that produce the model's output (the classifier).

    The last conv/linear executed in a forward pass is the classifier; its output
    channels are the classes and are never pruned.
    """
    order: list[str] = []
    forward_with_hooks(model, example_input, {m: lambda mod, i, o, n=n: order.append(n)
                                              for n, m in model.named_modules()
                                              if isinstance(m, ROOT_TYPES)})
    if not order:
        raise ModelError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    return [order[-1]]


def build_graph(model: nn.Module, example_input: torch.Tensor | tuple) -> tp.DependencyGraph:
    """Trace ``model`` into a Torch-Pruning DependencyGraph, with a clear error on failure.

    While Torch-Pruning traces, hooks note which autograd node each leaf module's
    output came from (``graph.leaf_outputs``: grad_fn → (module name, channels)), so
    the graph's anonymous op nodes can be matched to modules such as pooling layers.
    """
    was_training = model.training
    model.eval()
    leaf_outputs: dict = {}

    def note(name):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None and output.dim() > 1:
                leaf_outputs[output.grad_fn] = (name, int(output.shape[1]))
        return hook

    hooks = [m.register_forward_hook(note(n)) for n, m in leaf_modules(model).items()]
    running: list[str] = []  # modules whose forward has started and not returned
    failed: list[str] = []   # ``running`` when a first forward attempt broke off (TP then retries)

    def enter(name):
        def hook(module, inputs):
            if not name and running and not failed:
                failed[:] = running
            if not name:
                running.clear()
            running.append(name)
        return hook

    def leave(module, inputs, output):
        running.pop()

    for n, m in model.named_modules():
        hooks += [m.register_forward_pre_hook(enter(n)), m.register_forward_hook(leave)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=as_input_tuple(example_input), verbose=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the model and module named
        if _interrupted(exc):  # Ctrl-C in the first forward; Torch-Pruning's retry hid it
            raise KeyboardInterrupt from None
        stack, cause = failed or running, exc
        while failed and cause.__context__ is not None:  # the first attempt's error, not the retry's
            cause = cause.__context__
        where = f" in module {stack[-1]!r} ({type(model.get_submodule(stack[-1])).__name__})" \
            if stack and stack[-1] else " after its forward pass"
        raise ModelError(
            f"cannot trace {type(model).__name__} into a dependency graph{where}: "
            f"{type(cause).__name__}: {cause}") from exc
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    graph.leaf_outputs = leaf_outputs
    return graph


def _interrupted(exc: BaseException) -> bool:
    """Whether a KeyboardInterrupt is anywhere in ``exc``'s chain (``__cause__``/``__context__``)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        stack += [e.__cause__, e.__context__]
    return False


class Space:
    """The prunable units of ``model`` and the exact analytic cost of any widths.

    >>> space = Space(model, torch.randn(1, 3, 32, 32))
    >>> [u.name for u in space.units][:2]
    >>> space.cost({u.name: u.width // 2 for u in space.units})
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple, *,
                 min_width: int = 1, round_to: int | None = None,
                 ignored: list[str] | None = None) -> None:
        self.model = model
        self.example_input = example_input
        self.input_shape = tuple(as_input_tuple(example_input)[0].shape)
        self.ignored = list(ignored or []) + output_layers(model, example_input)
        graph = build_graph(model, example_input)
        self.units, self.maps = _units_and_maps(model, graph, self.ignored, min_width, round_to or 1)
        self._check_units(model)
        self._by_name = {u.name: u for u in self.units}
        self.cost_model = CostModel.measure(model, example_input, self, graph)

    def __getstate__(self) -> dict:
        """Pickle without the graph-node channel maps (only the cost builder needs them),
        so a Space can be shipped once to Ray workers."""
        state = dict(self.__dict__)
        state["maps"] = None
        return state

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def unit_names(self) -> list[str]:
        return [u.name for u in self.units]

    def unit(self, name: str) -> Unit:
        """The unit called ``name``; ModelError listing near names if absent."""
        if name in self._by_name:
            return self._by_name[name]
        import difflib
        near = difflib.get_close_matches(name, self.unit_names, n=3)
        raise ModelError(f"no prunable unit named {name!r}" + (f"; did you mean {near}?" if near else ""))

    def full_widths(self) -> dict[str, int]:
        return {u.name: u.width for u in self.units}

    def min_widths(self) -> dict[str, int]:
        return {u.name: u.min_width for u in self.units}

    def cost(self, widths: Mapping[str, int] | None = None):
        """Analytic FLOPs (multiply-adds) and params of the structure with ``widths`` kept."""
        return self.cost_model(self.complete(widths or {}))

    def fit(self, ratios: Mapping[str, float], budget, max_ratio: float = 0.9) -> dict[str, int]:
        """Integer widths of the structure shaped by ``ratios`` that meets ``budget``.

        ``ratios`` maps unit → fraction to prune (missing units: 0); they give the
        shape, one scale factor found by bisection meets the budget.
        """
        from .budget import fit_widths
        return fit_widths(self, ratios, budget, max_ratio=max_ratio)

    def complete(self, widths: Mapping[str, int]) -> dict[str, int]:
        """``widths`` with every unit not named kept whole; checks names and ranges."""
        unknown = set(widths) - set(self.unit_names)
        if unknown:
            self.unit(sorted(unknown)[0])
        out = self.full_widths()
        for name, kept in widths.items():
            unit = self.unit(name)
            if not 1 <= int(kept) <= unit.width:
                raise OptionError(f"unit {name}: kept width {short(kept)} outside 1..{unit.width}")
            out[name] = int(kept)
        return out

    def _check_units(self, model: nn.Module) -> None:
        if not self.units:
            raise ModelError(f"{type(model).__name__}: the dependency graph found no prunable "
                             "channel (only the classifier?)")


def _channel_groups(module: nn.Module) -> int:
    """Channel groups selection must respect: grouped (not depthwise) convs prune alike per group."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and 1 < module.groups < module.in_channels:
        return module.groups
    return 1


def _units_and_maps(model: nn.Module, graph: tp.DependencyGraph, ignored: list[str],
                    min_width: int, round_to: int):
    """Units (one per dependency group) and, per graph node, the channel counts per unit."""
    name_of = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(name_of.values())}
    ignored_modules = [model.get_submodule(n) for n in ignored]
    units: list[Unit] = []
    maps: dict[tuple[object, str], dict[str, int]] = defaultdict(dict)
    for group in graph.get_all_groups(ignored_layers=ignored_modules, root_module_types=ROOT_TYPES):
        unit = _unit_of(group, graph, name_of, order, min_width, round_to)
        units.append(unit)
        for it in group.items:
            side = "out" if graph.is_out_channel_pruning_fn(it.dep.handler) else "in"
            maps[(it.dep.target.module, side)][unit.name] = len(it.idxs)
    units.sort(key=lambda u: order[u.name])
    return units, dict(maps)


def _unit_of(group, graph, name_of: dict, order: dict, min_width: int, round_to: int) -> Unit:
    """Describe one Torch-Pruning group as a Unit named after its first root layer."""
    def named(types, out: bool) -> list:
        return sorted((it for it in group.items if isinstance(it.dep.target.module, types)
                       and it.dep.target.module in name_of
                       and graph.is_out_channel_pruning_fn(it.dep.handler) == out),
                      key=lambda it: order[name_of[it.dep.target.module]])

    roots = tuple(dict.fromkeys(name_of[it.dep.target.module] for it in named(ROOT_TYPES, True)))
    norms = tuple(dict.fromkeys(name_of[it.dep.target.module] for it in named(NORM_TYPES, True)))
    consumers = tuple((name_of[it.dep.target.module], tuple(map(int, it.idxs)),
                       tuple(map(int, it.root_idxs))) for it in named(ROOT_TYPES, False))
    width = len(group[0].idxs)
    groups = math.lcm(*[_channel_groups(it.dep.target.module) for it in group.items
                        if isinstance(it.dep.target.module, nn.Module)])
    step = math.lcm(groups, round_to)
    step = step if width % step == 0 else groups
    low = min(width, max(step, math.ceil(min_width / step) * step))
    return Unit(roots[0], width, low, step, groups, roots, norms, consumers)
