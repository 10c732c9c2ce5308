"""Datasets by name: ``load(name, image_size, seed, root, download, **options)`` looks the
name up in one registry — ``digits``, ``synthetic``, ``fashion-mnist`` (:mod:`.memory`),
``cifar10``, ``cifar100``, ``imagefolder:PATH`` (:mod:`.files`) — checks the options once,
and returns a :class:`DataBundle` whose train/val/test splits are fixed by ``seed`` (:mod:`.splits`)
and whose JSON-able ``settings`` record what was loaded (they go into reports).
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, short
from ..limits import MAX_IMAGE_SIZE
from .bundle import DataBundle, LabeledTensors, TransformedSubset
from .files import CIFAR_STATS, IMAGENET_MEAN, IMAGENET_STD, load_cifar10, load_cifar100, load_imagefolder, read_pickle
from .memory import FASHION_MNIST_CLASSES, load_digits, load_fashion_mnist, load_synthetic
from .splits import split_indices

__all__ = [
    "CIFAR_STATS", "DATASET_NAMES", "FASHION_MNIST_CLASSES", "IMAGENET_MEAN", "IMAGENET_STD", "DataBundle",
    "LabeledTensors", "TransformedSubset", "load", "loader", "read_pickle", "split_indices",
]

DATASET_NAMES = ("digits", "synthetic", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH")

_LOADERS: dict[str, Callable[..., DataBundle]] = {
    "digits": load_digits,
    "synthetic": load_synthetic,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
}


def load(
    name: str,
    image_size: int | None = None,
    seed: int = 0,
    root: str | None = None,
    download: bool = False,
    **kw: Any,
) -> DataBundle:
    """Load a dataset by name with deterministic, seed-dependent splits."""
    text = str(name).strip()
    if text.lower().startswith("imagefolder:"):
        key, kw = "imagefolder", {**kw, "path": text.split(":", 1)[1]}
    else:
        key = text.lower()
    if key not in _LOADERS:
        close = difflib.get_close_matches(key[:100], [n.split(":")[0] for n in DATASET_NAMES], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DataError(f"unknown dataset {short(name)}{hint}; valid names: {', '.join(DATASET_NAMES)}")
    bad_size = isinstance(image_size, bool) or not isinstance(image_size, int) \
        or not 1 <= image_size <= MAX_IMAGE_SIZE
    if image_size is not None and bad_size:
        raise DataError(f"image_size must be an integer from 1 to {MAX_IMAGE_SIZE} (or None), "
                        f"got {short(image_size)}")
    fn = _LOADERS[key]
    _check_kwargs(key, fn, kw)
    return fn(image_size=image_size, seed=int(seed), root=root, download=download, **kw)


def loader(
    dataset: Dataset,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling order is fixed by ``seed`` (its own generator)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        drop_last=drop_last,
    )


def _check_kwargs(key: str, fn: Callable, kw: dict[str, Any]) -> None:
    common = {"image_size", "seed", "root", "download", "path"}
    valid = [p for p in inspect.signature(fn).parameters if p not in common]
    for k in kw:
        if k == "path" and key == "imagefolder":
            continue
        if k not in valid:
            close = difflib.get_close_matches(k, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            options = ", ".join(valid) if valid else "none"
            raise DataError(f"dataset {key!r} has no option {k!r}{hint}; its options: {options}")
