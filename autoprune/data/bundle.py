"""The values every dataset loader returns: a :class:`DataBundle` of train/val/test datasets
with its metadata, and the two dataset types the loaders build it from —
:class:`LabeledTensors` (images held in memory) and :class:`TransformedSubset` (items of a
base dataset, e.g. CIFAR or an image folder, passed through a transform on access).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset, TensorDataset


@dataclass
class DataBundle:
    """Train/val/test datasets yielding ``(float image CxHxW, int label)`` plus metadata."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)


class LabeledTensors(TensorDataset):
    """In-memory ``(images, labels)`` tensors; items are ``(image, int label)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        super().__init__(images, labels)

    @property
    def images(self) -> torch.Tensor:
        return self.tensors[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.tensors[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.tensors[0][index], int(self.tensors[1][index])


class TransformedSubset(Dataset):
    """Items ``indices`` of ``base`` (yielding ``(image, label)``) passed through ``transform``."""

    def __init__(self, base: Any, indices: Sequence[int], transform: Callable | None) -> None:
        self.base, self.indices, self.transform = base, [int(i) for i in indices], transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[index]]
        return (self.transform(image) if self.transform else image), int(label)


def split_sizes(train: Dataset, val: Dataset, test: Dataset) -> dict[str, int]:
    """The ``sizes`` entry of a bundle's settings: samples per split."""
    return {"train": len(train), "val": len(val), "test": len(test)}
