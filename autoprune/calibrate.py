"""One calibration pass: hooks tap every unit, criteria fold batches into summaries.

Only what the requested criteria need is tapped (``pre``: root conv output before
its norm; ``post``: the unit's channels as the next layer reads them), and one
gradient pass runs only if a criterion asks for gradients. Summaries are streaming
and fixed-size, and can be cached on disk keyed by weights, data and settings.
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
from .criteria.base import Batch, Criterion, Stats
from .space import Space, Unit


def _post_index(unit: Unit) -> tuple[str, torch.Tensor, int] | None:
    """First consumer of ``unit`` and its input positions ordered channel by channel."""
    if not unit.consumers:
        return None
    name, positions, channels = unit.consumers[0]
    order = sorted(range(len(positions)), key=lambda i: (channels[i], positions[i]))
    return name, torch.tensor([positions[i] for i in order]), len(positions) // unit.width


def _gather(x: torch.Tensor, index: torch.Tensor, stride: int, width: int) -> torch.Tensor:
    picked = x.index_select(1, index.to(x.device))
    return picked if stride == 1 else picked.reshape(x.shape[0], width, stride, *x.shape[2:])


@contextmanager
def _tapping(model: nn.Module, space: Space, taps: set[str], keep_graph: bool) -> Iterator[tuple]:
    """Hooks filling ``captured`` (tap, unit) → raw tensor on every forward pass.

    ``views`` maps each key to the function that cuts the unit's channels out of the
    raw tensor, in unit order; maps and gradients are both cut after the pass, since a
    gradient exists only for the tensor the network actually used.
    """
    captured: dict[tuple[str, str], torch.Tensor] = {}
    views: dict[tuple[str, str], object] = {}
    hooks = []

    def store(key, tensor):
        captured[key] = tensor if keep_graph else tensor.detach()

    def output_tap(key, module):
        views[key] = lambda t: t
        hooks.append(module.register_forward_hook(lambda m, i, o: store(key, o)))

    for unit in space.units:
        root = model.get_submodule(unit.name)
        if "pre" in taps:
            output_tap(("pre", unit.name), root)
        post = _post_index(unit) if "post" in taps else None
        if post:
            name, index, stride = post
            key = ("post", unit.name)
            views[key] = lambda t, ix=index, s=stride, w=unit.width: _gather(t, ix, s, w)
            hooks.append(model.get_submodule(name).register_forward_pre_hook(
                lambda m, i, k=key: store(k, i[0])))
        elif "post" in taps:  # no consumer: the unit's own output is what it passes on
            output_tap(("post", unit.name), root)
    try:
        yield captured, views
    finally:
        for h in hooks:
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
    h.update(f"{n_images}|{data_key}".encode())
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
        with _tapping(model, space, taps, keep_graph=grad) as (captured, views):
            for x, y in batches:
                x, y = x[: n_images - seen].to(device), y[: n_images - seen].to(device)
                batch = _forward(model, captured, views, x, y, grad) if taps else Batch({}, {}, y)
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


def _forward(model: nn.Module, captured: dict, views: dict, x: torch.Tensor, y: torch.Tensor,
             grad: bool) -> Batch:
    captured.clear()
    grads: dict = {}
    if not grad:
        with torch.no_grad():
            model(x)
    else:
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            keys = list(captured)
            found = torch.autograd.grad(loss, [captured[k] for k in keys], allow_unused=True)
        grads = {k: views[k](g.detach()) for k, g in zip(keys, found) if g is not None}
    maps = {k: views[k](t.detach()) for k, t in captured.items()}
    return Batch(maps, grads, y)


def save_stats(stats: Stats, path: str | Path) -> None:
    """Write summaries atomically (plain tensors and dicts: loadable with weights_only)."""
    from .checkpoint import atomic_save
    atomic_save({"stats": dict(stats), "settings": stats.settings, "state_dict": {}}, path)


def load_stats(path: str | Path) -> Stats:
    from .checkpoint import read_checkpoint
    data = read_checkpoint(path)
    return Stats(data["stats"], data["settings"])
