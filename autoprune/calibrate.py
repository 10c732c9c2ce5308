"""One calibration pass: hooks tap every unit, criteria fold batches into summaries.

Only what the requested criteria need is tapped, at every member of every unit
(:func:`autoprune.criteria.base.members`; ``pre``: each root conv/linear output before
its norm — a residual stream's every writer; ``post``: the unit's channels as each
consumer reads them — the stream before and after every add), and one gradient pass
runs only if a criterion asks for gradients. Summaries are streaming and fixed-size
(one slice per member), and can be cached on disk keyed by weights, data and settings.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import criteria as _criteria
from .criteria.base import Batch, Criterion, Stats, members
from .errors import ModelError
from .space import Space, Unit


SUMMARY_LAYOUT = "members-1"
"""Version of the summaries' layout (one slice per member), part of the cache key so a
cache written by an older layout is never read back as this one."""


def _channels_first(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``t`` with the channels ``module`` writes or reads on dim 1: a linear layer applied to
    [N, ..., C] (channels last, as in ConvNeXt or a transformer) has them last."""
    return t.movedim(-1, 1) if isinstance(module, nn.Linear) and t.dim() > 2 else t


def _gather(x: torch.Tensor, index: torch.Tensor, stride: int, width: int) -> torch.Tensor:
    picked = x.index_select(1, index.to(x.device))
    return picked if stride == 1 else picked.reshape(x.shape[0], width, stride, *x.shape[2:])


def _reader_index(unit: Unit, consumer: str) -> tuple[torch.Tensor, int]:
    """The input positions of ``consumer`` holding ``unit``'s channels, ordered channel by
    channel, and the positions per channel (a flatten into a linear layer has several)."""
    positions, channels = next((p, c) for name, p, c in unit.consumers if name == consumer)
    order = sorted(range(len(positions)), key=lambda i: (channels[i], positions[i]))
    return torch.tensor([positions[i] for i in order]), len(positions) // unit.width


class _Taps:
    """Hooks filling ``captured`` (tap, unit, member) → raw tensor on every forward pass.

    ``views`` maps each key to the function that cuts the unit's channels out of the raw
    tensor, in unit order; maps and gradients are both cut after the pass, since a
    gradient exists only for the tensor the network actually used. ``reads`` identifies
    a reader's positions, so two readers of the very same tensor and positions (a block's
    conv and its projection shortcut) are counted once.
    """

    def __init__(self) -> None:
        self.captured: dict[tuple[str, str, str], torch.Tensor] = {}
        self.views: dict[tuple[str, str, str], object] = {}
        self.reads: dict[tuple[str, str, str], tuple] = {}
        self.first: dict[tuple[str, str], str] = {}
        self.hooks: list = []

    def _add(self, key, view, hook) -> None:
        self.views[key] = view
        self.first.setdefault(key[:2], key[2])
        self.hooks.append(hook)

    def _store(self, key, tensor) -> None:
        self.captured[key] = tensor  # as the network made it: its identity marks shared reads

    def output(self, key, module: nn.Module) -> None:
        self._add(key, lambda t, m=module: _channels_first(m, t), module.register_forward_hook(
            lambda m, i, o, k=key: self._store(k, o)))

    def input(self, key, module: nn.Module, unit: Unit) -> None:
        index, stride = _reader_index(unit, key[2])
        self.reads[key] = (tuple(index.tolist()), stride)
        self._add(key, lambda t, m=module, ix=index, s=stride, w=unit.width: _gather(
            _channels_first(m, t), ix, s, w), module.register_forward_pre_hook(
            lambda m, i, k=key: self._store(k, i[0])))

    def distinct(self) -> list[tuple[str, str, str]]:
        """Captured keys, less readers of a tensor (and positions) an earlier reader of the
        same unit already read."""
        seen, out = set(), []
        for key, t in self.captured.items():
            if key in self.reads:
                sig = (key[1], id(t), self.reads[key])
                if sig in seen:
                    continue
                seen.add(sig)
            out.append(key)
        return out


def _check_writer(module: nn.Module, unit: Unit, member: str) -> None:
    weight = getattr(module, "weight", None)
    if weight is None or weight.shape[0] != unit.width:
        got = "no weight" if weight is None else f"{weight.shape[0]} output channels"
        raise ModelError(f"unit {unit.name}: root layer {member} has {got}, the unit {unit.width}; "
                         "calibration taps every root layer of a unit")


@contextmanager
def _tapping(model: nn.Module, space: Space, taps: set[str]) -> Iterator[_Taps]:
    """Hooks on every member of every unit (``pre``: each root layer's output; ``post``: each
    consumer's input, or the unit's own output when nothing reads it), removed afterwards."""
    tapped = _Taps()
    try:
        for unit in space.units:
            if "pre" in taps:
                for member in members(unit, "pre"):
                    module = model.get_submodule(member)
                    _check_writer(module, unit, member)
                    tapped.output(("pre", unit.name, member), module)
            if "post" in taps and unit.consumers:
                for member in members(unit, "post"):
                    tapped.input(("post", unit.name, member), model.get_submodule(member), unit)
            elif "post" in taps:  # no consumer: the unit's own output is what it passes on
                tapped.output(("post", unit.name, unit.name), model.get_submodule(unit.name))
        yield tapped
    finally:
        for h in tapped.hooks:
            h.remove()


def _instantiate(spec) -> Criterion:
    if isinstance(spec, Criterion):
        return spec
    name, params = (spec, {}) if isinstance(spec, str) else spec
    return _criteria.get(name, **params)


def _cache_key(model: nn.Module, first: torch.Tensor, crits: Sequence[Criterion], n_images: int,
               data_key: str | None) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(first.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps([[c.name, c.params] for c in crits], sort_keys=True, default=str).encode())
    h.update(f"{n_images}|{data_key}|{SUMMARY_LAYOUT}".encode())
    return h.hexdigest()[:24]


def calibrate(space: Space, model: nn.Module, batches: Iterable, criteria: Sequence = ("l1",),
              n_images: int = 512, device: str | torch.device | None = None,
              progress: bool = True, cache_dir: str | Path | None = None,
              data_key: str | None = None) -> Stats:
    """Collect every requested criterion's per-unit summaries in one pass over ``batches``.

    ``batches`` yields (images, labels); ``criteria`` are names, (name, params) pairs or
    Criterion instances. With ``cache_dir``, results are stored under a key of the
    weights, the first batch, ``data_key`` and the settings, and reused next time.
    """
    crits = [_instantiate(c) for c in criteria]
    device = torch.device(device) if device else next(model.parameters()).device
    iterator = iter(batches)
    first = next(iterator)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"stats-{_cache_key(model, first[0], crits, n_images, data_key)}.pt"
        if path.is_file():
            return load_stats(path)
    stats = _run(space, model, _chain(first, iterator), crits, n_images, device, progress)
    if path is not None:
        save_stats(stats, path)
    return stats


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run criterion updates on one thread: batched small-matrix LAPACK calls (SVD,
    eigh, rank) are 5-100x slower multi-threaded on a busy CPU, and gain nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _chain(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


def _run(space: Space, model: nn.Module, batches: Iterator, crits: list[Criterion],
         n_images: int, device: torch.device, progress: bool) -> Stats:
    taps = set().union(*(c.taps() for c in crits))
    grad = any(c.needs_grad for c in crits)
    states = {c.name: {u.name: c.init(u, space) for u in space.units} for c in crits}
    was_training = model.training
    model.eval()
    seen = 0
    bar = tqdm(total=n_images, desc="calibrate", unit="img", disable=not progress, leave=False)
    try:
        with _tapping(model, space, taps) as tapped:
            for x, y in batches:
                x, y = x[: n_images - seen].to(device), y[: n_images - seen].to(device)
                batch = _forward(model, tapped, x, y, grad) if taps else Batch({}, {}, y)
                with _single_thread():
                    for c in crits:
                        for u in space.units:
                            c.update(u, states[c.name][u.name], batch)
                seen += len(x)
                bar.update(len(x))
                if seen >= n_images:
                    break
    finally:
        bar.close()
        model.train(was_training)
    settings = {"n_images": seen, "criteria": {c.name: c.params for c in crits}}
    return Stats(states, settings)


def _forward(model: nn.Module, tapped: _Taps, x: torch.Tensor, y: torch.Tensor, grad: bool) -> Batch:
    tapped.captured.clear()
    grads: dict = {}
    if not grad:
        with torch.no_grad():
            model(x)
        keys = tapped.distinct()
    else:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            keys = tapped.distinct()
            found = torch.autograd.grad(loss, [tapped.captured[k] for k in keys], allow_unused=True)
        grads = {k: tapped.views[k](g.detach()) for k, g in zip(keys, found) if g is not None}
    maps = {k: tapped.views[k](tapped.captured[k].detach()) for k in keys}
    for table in (maps, grads):  # the first member also under (tap, unit)
        for (tap, unit), member in tapped.first.items():
            if (tap, unit, member) in table:
                table[(tap, unit)] = table[(tap, unit, member)]
    tapped.captured.clear()
    return Batch(maps, grads, y)


def save_stats(stats: Stats, path: str | Path) -> None:
    """Write summaries atomically (plain tensors and dicts: loadable with weights_only)."""
    from .checkpoint import atomic_save
    atomic_save({"stats": dict(stats), "settings": stats.settings, "state_dict": {}}, path)


def load_stats(path: str | Path) -> Stats:
    from .checkpoint import read_checkpoint
    data = read_checkpoint(path)
    return Stats(data["stats"], data["settings"])
