"""Deterministic splits and the steps every in-memory dataset shares.

``split_indices`` gives stratified (train, val, test) index arrays fixed by ``seed``; a size
is a fraction of the whole set (float in [0, 1)) or a sample count (int). In-memory images
are normalised per channel with the *train* split's statistics only (no test leakage), and
:func:`check_in_memory` refuses, before allocating, images that would not fit in memory.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..limits import check_fits
from .bundle import DataBundle, LabeledTensors, split_sizes


def split_indices(
    labels: Sequence[int] | np.ndarray,
    seed: int = 0,
    test: float | int = 0.2,
    val: float | int = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (train, val, test) index arrays; fractions are of the whole set."""
    labels = np.asarray(labels)
    n = len(labels)
    n_test, n_val = sample_count(test, n, "test"), sample_count(val, n, "val")
    if n_test + n_val >= n:
        raise DataError(f"test ({n_test}) + val ({n_val}) samples leave no training data out of {n}")
    rest, test_idx = stratified_split(np.arange(n), labels, n_test, seed)
    train_idx, val_idx = stratified_split(rest, labels[rest], n_val, seed)
    return train_idx, val_idx, test_idx


def sample_count(size: float | int, n: int, what: str) -> int:
    """A split size given as a fraction (float in [0, 1)) or a sample count (int)."""
    if isinstance(size, bool) or not isinstance(size, (int, float)) or size < 0:
        raise DataError(f"{what} size must be a fraction in [0, 1) or a sample count, got {size!r}")
    if isinstance(size, float):
        if size >= 1:
            raise DataError(f"{what} fraction must be below 1, got {size}")
        return int(round(size * n))
    if size >= n:
        raise DataError(f"{what} size {size} leaves no samples out of {n}; pass a smaller {what}_size")
    return int(size)


def stratified_split(
    idx: np.ndarray, labels: np.ndarray, size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, held-out of ``size``), stratified whenever the counts allow it."""
    from sklearn.model_selection import train_test_split

    if size <= 0:
        return np.sort(idx), np.array([], dtype=np.int64)
    if size >= len(idx):
        raise DataError(f"cannot hold out {size} samples from only {len(idx)}")
    classes, counts = np.unique(labels, return_counts=True)
    can_stratify = counts.min() >= 2 and len(classes) <= min(size, len(idx) - size)
    rest, held = train_test_split(
        idx, test_size=size, random_state=seed, stratify=labels if can_stratify else None
    )
    return np.sort(rest), np.sort(held)


def standardise(x: torch.Tensor, train_idx: np.ndarray) -> tuple[torch.Tensor, list[float], list[float]]:
    """Normalise per channel with the train split's statistics (no test leakage)."""
    train = x[torch.as_tensor(train_idx)]
    mean = train.mean(dim=(0, 2, 3))
    std = train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    out = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return out, mean.tolist(), std.tolist()


def take(x: torch.Tensor, y: torch.Tensor, *index_arrays: np.ndarray) -> list[LabeledTensors]:
    """One :class:`LabeledTensors` per index array: those rows of ``x`` and ``y``, copied."""
    return [LabeledTensors(x[torch.as_tensor(i, dtype=torch.long)].contiguous(),
                           y[torch.as_tensor(i, dtype=torch.long)].contiguous())
            for i in index_arrays]


def in_memory_bundle(
    name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int,
    settings: dict[str, Any], test_size: float | int, val_size: float | int,
) -> DataBundle:
    """Split, normalise with train statistics and wrap in-memory tensors."""
    train_idx, val_idx, test_idx = split_indices(y.numpy(), seed, test_size, val_size)
    x, mean, std = standardise(x, train_idx)
    parts = take(x, y, train_idx, val_idx, test_idx)
    settings = {**settings, "seed": seed, "test_size": test_size, "val_size": val_size,
                "mean": mean, "std": std, "sizes": split_sizes(*parts)}
    return DataBundle(*parts, num_classes=num_classes, input_shape=tuple(x.shape[1:]),
                      name=name, settings=settings, classes=[str(c) for c in range(num_classes)])


def check_in_memory(name: str, n: int, channels: int, size: int) -> None:
    """SizeError unless ``n`` float images of ``channels``x``size``x``size`` fit in memory
    (three copies live at once while resizing and normalising)."""
    check_fits(3 * 4 * n * channels * size * size, f"{name} at image size {size} ({n} images held in memory)",
               "use a smaller --image-size")


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of an NCHW batch to ``size`` x ``size`` (unchanged if already that size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
