"""Prefix reuse for the greedy's candidate evaluations: what a candidate cannot change is
computed once per step, not once per candidate.

Every candidate of one greedy step differs from the committed structure in one unit's mask.
A forward pass is a sequential program, so every module call that *ends* before the first
output that unit's mask touches computes exactly what it computes under the committed masks.
:class:`ExecutionOrder` records once, on one image, when every module call starts and ends;
for a unit, the *clean* modules are those whose every call ends before the unit's first masked
output, and the coarsest of them (whose parent is not clean) that hold parameters or buffers
are replayed (:func:`replay`) from outputs recorded (:func:`record`) under the committed
masks instead of being recomputed. Modules the replay skips never run, so the norms inside
them keep whatever statistics they had; the same modules are replayed in the adaptive-BN pass
and the validation pass, so those statistics are never read.

Exact, not an approximation: a replayed output is bit-for-bit the output the module would
compute (same inputs, same weights, same statistics), and the tests assert that candidates'
accuracies equal the evaluations without reuse. The assumption, stated: the model's control
flow does not depend on the data or on the masks (true of the CNNs here; a model that
branches on its activations must not use it, ``MaskedEvaluator(..., reuse_prefix=False)``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from .space import Unit


class ExecutionOrder:
    """When each module call starts and ends in one forward pass of ``model`` on ``example``
    (eval mode, no gradients), and each module's output size per image (summed over calls;
    None when an output is not a tensor, which then is never cached)."""

    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.first_end: dict[str, int] = {}
        self.last_end: dict[str, int] = {}
        self.numel: dict[str, int | None] = {}
        clock, hooks = [0], []

        def tick() -> int:
            clock[0] += 1
            return clock[0]

        def before(module, inputs) -> None:  # a pre-hook's return value would replace the inputs
            tick()

        def after(name: str, output) -> None:
            t = tick()
            self.first_end.setdefault(name, t)
            self.last_end[name] = t
            if not (isinstance(output, torch.Tensor) and output.dim()):
                self.numel[name] = None  # never cached
            elif self.numel.get(name, 0) is not None:
                self.numel[name] = self.numel.get(name, 0) + output[0].numel()

        self.names = [name for name, _ in model.named_modules() if name]
        for name in self.names:
            module = model.get_submodule(name)
            hooks.append(module.register_forward_pre_hook(before))
            hooks.append(module.register_forward_hook(lambda m, i, o, n=name: after(n, o)))
        was_training = model.training
        try:
            with torch.no_grad():
                model.eval()(example[:1])
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        self._stateful = {name for name in self.names
                          if any(True for _ in model.get_submodule(name).parameters())
                          or any(True for _ in model.get_submodule(name).buffers())}

    def start(self, unit: Unit) -> int | None:
        """The clock at the unit's first masked output (None: its layers never run)."""
        ends = [self.first_end[layer] for layer in (unit.norms or unit.modules) if layer in self.first_end]
        return min(ends) if ends else None

    def clean(self, unit: Unit) -> list[str]:
        """The coarsest modules with parameters or buffers whose every call ends before the
        unit's first masked output, and whose outputs are tensors: what a candidate that cuts
        ``unit`` can replay."""
        start = self.start(unit)
        if start is None:
            return []
        clean = {n for n in self.names if n in self.last_end and self.last_end[n] < start}
        return [n for n in self.names
                if n in clean and n in self._stateful and self.numel.get(n) is not None
                and not _has_clean_parent(n, clean)]

    def mb(self, names: Sequence[str], images: int) -> float:
        """Memory in MB to record ``names`` for ``images`` images (float32)."""
        return sum(self.numel[n] or 0 for n in names) * images * 4 / 2**20


def _has_clean_parent(name: str, clean: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in clean for i in range(1, len(parts)))


@contextmanager
def record(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every call of the modules ``names`` appends a copy of its output
    (after any earlier-registered hooks, e.g. channel masks) to ``cache[name]``."""
    cache: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: cache[n].append(o.detach().clone()))
             for n in names]
    try:
        yield cache
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def replay(model: nn.Module, names: Sequence[str], cache: Mapping[str, list[torch.Tensor]]) -> Iterator[None]:
    """Within the block, the modules ``names`` do not compute: their k-th call returns a copy
    of ``cache[name][k]`` (a copy, so in-place consumers such as ``ReLU(inplace=True)`` never
    change the cache). Calls beyond the recorded ones are an error, not a recomputation."""
    patched = []
    for name in names:
        module, calls, counter = model.get_submodule(name), cache[name], [0]

        def forward(*args, _calls=calls, _counter=counter, _name=name, **kwargs):
            if _counter[0] >= len(_calls):
                raise RuntimeError(f"prefix replay: {_name} called more often than recorded")
            _counter[0] += 1
            return _calls[_counter[0] - 1].clone()

        patched.append((module, vars(module).get("forward")))
        module.forward = forward
    try:
        yield
    finally:
        for module, own in patched:
            if own is None:
                del module.forward
            else:
                module.forward = own


__all__ = ["ExecutionOrder", "record", "replay"]
