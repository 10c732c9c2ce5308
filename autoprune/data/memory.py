"""Datasets held in memory as tensors: ``digits`` (scikit-learn's bundled 8x8 digits),
``synthetic`` (smooth per-class prototypes plus noise) and ``fashion-mnist`` (its four IDX
files, read by :mod:`autoprune.idx`, with the official train/test split). Each loader takes
``(image_size, seed, root, download, **options)`` and returns a normalised
:class:`~autoprune.data.bundle.DataBundle` of :class:`~autoprune.data.bundle.LabeledTensors`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError, short
from .bundle import DataBundle, split_sizes
from .splits import check_in_memory, in_memory_bundle, resize, sample_count, standardise, stratified_split, take

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


def load_digits(
    image_size: int | None, seed: int, root: str | None, download: bool,
    channels: int = 3, test_size: float | int = 0.2, val_size: float | int = 0.1,
) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images), upsampled bilinearly."""
    from sklearn.datasets import load_digits as sklearn_digits

    if channels not in (1, 3):
        raise DataError(f"digits: channels must be 1 or 3, got {channels!r}")
    size = 16 if image_size is None else image_size
    images, labels = sklearn_digits(return_X_y=True)
    check_in_memory("digits", len(labels), channels, size)
    x = torch.from_numpy(images.astype(np.float32)).view(-1, 1, 8, 8)
    x = resize(x, size).repeat(1, channels, 1, 1)
    y = torch.from_numpy(labels.astype(np.int64))
    settings = {"name": "digits", "image_size": size, "channels": channels}
    return in_memory_bundle("digits", x, y, 10, seed, settings, test_size, val_size)


def load_synthetic(
    image_size: int | None, seed: int, root: str | None, download: bool,
    num_classes: int = 4, n_per_class: int = 64, channels: int = 3, noise: float = 0.5,
    test_size: float | int = 0.2, val_size: float | int = 0.1,
) -> DataBundle:
    """Per-class smooth random prototypes plus Gaussian noise: easy, tunable test data."""
    if num_classes < 2 or n_per_class < 1 or channels < 1 or noise < 0:
        raise DataError(
            "synthetic: need num_classes >= 2, n_per_class >= 1, channels >= 1 and noise >= 0, got "
            f"num_classes={num_classes}, n_per_class={n_per_class}, channels={channels}, noise={noise}"
        )
    size = 16 if image_size is None else image_size
    check_in_memory("synthetic", num_classes * n_per_class, channels, size)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=gen)
    protos = resize(coarse, size)
    protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
    protos = protos / protos.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = protos[y] + noise * torch.randn(len(y), channels, size, size, generator=gen)
    settings = {"name": "synthetic", "image_size": size, "num_classes": num_classes,
                "n_per_class": n_per_class, "channels": channels, "noise": noise}
    return in_memory_bundle("synthetic", x, y, num_classes, seed, settings, test_size, val_size)


def load_fashion_mnist(
    image_size: int | None, seed: int, root: str | None, download: bool,
    channels: int = 3, val_size: int = 5000, train_size: int | None = None,
) -> DataBundle:
    """Fashion-MNIST: the official 60,000 / 10,000 split from its four IDX files
    (:func:`autoprune.idx.fashion_mnist_files` says where they are looked for). The
    validation set (``val_size``, stratified, seed-dependent) is carved from the official
    train set; ``train_size`` keeps a stratified subset of the rest; the official test set
    is the test set. Grayscale images are repeated to ``channels=3`` (default: every model
    here takes 3 channels; ``channels=1`` keeps one) and normalised with the train split's
    statistics; ``image_size`` (default 28) resizes bilinearly."""
    from ..idx import fashion_mnist_files, read_idx

    if channels not in (1, 3):
        raise DataError(f"fashion-mnist: channels must be 1 or 3, got {short(channels)}")
    files = fashion_mnist_files(root, download)
    images = {split: read_idx(files[f"{split}_images"], 3) for split in ("train", "test")}
    labels = {split: read_idx(files[f"{split}_labels"], 1) for split in ("train", "test")}
    for split in ("train", "test"):
        if len(images[split]) != len(labels[split]) or labels[split].max() > 9:
            raise DataError(f"fashion-mnist {split} files disagree: {len(images[split])} images, "
                            f"{len(labels[split])} labels (values up to {int(labels[split].max())}; expected 0-9)")
    size = 28 if image_size is None else image_size
    n_train, n_test = len(labels["train"]), len(labels["test"])
    check_in_memory("fashion-mnist", n_train + n_test, channels, size)
    y_train = labels["train"].astype(np.int64)
    rest, val_idx = stratified_split(np.arange(n_train), y_train, sample_count(val_size, n_train, "val"), seed)
    if train_size is not None:
        keep = sample_count(train_size, len(rest), "train")
        _, rest = stratified_split(rest, y_train[rest], keep, seed)
    x = torch.from_numpy(np.concatenate([images["train"], images["test"]])).float().div_(255).unsqueeze(1)
    x = resize(x, size)
    x, mean, std = standardise(x, rest)
    x = x.repeat(1, channels, 1, 1) if channels == 3 else x
    y = torch.from_numpy(np.concatenate([y_train, labels["test"].astype(np.int64)]))
    test_idx = np.arange(n_train, n_train + n_test)
    parts = take(x, y, rest, val_idx, test_idx)
    settings = {"name": "fashion-mnist", "image_size": size, "channels": channels, "seed": seed,
                "val_size": val_size, "train_size": train_size, "files": str(files["train_images"].parent),
                "mean": mean * channels, "std": std * channels, "sizes": split_sizes(*parts)}
    return DataBundle(*parts, num_classes=10, input_shape=(channels, size, size), name="fashion-mnist",
                      settings=settings, classes=list(FASHION_MNIST_CLASSES))
