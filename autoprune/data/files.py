"""Datasets read from disk: ``cifar10`` / ``cifar100`` (the python-pickle batch files, read
with a restricted unpickler that rebuilds only numpy arrays and builtin containers, never
plain ``pickle.load``; ``download=True`` fetches them with torchvision) and
``imagefolder:PATH`` (one sub-folder of images per class, or ``train/`` + ``val/``).
Both keep images as stored and resize, augment and normalise per item on access.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import TensorDataset

from ..errors import DataError
from .bundle import DataBundle, TransformedSubset, split_sizes
from .splits import sample_count, split_indices, stratified_split

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- CIFAR


_CIFAR_LAYOUT = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta", "labels": "labels",
                "names": "label_names", "num_classes": 10},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta",
                 "labels": "fine_labels", "names": "fine_label_names", "num_classes": 100},
}

_BUILTINS = ("list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int",
             "float", "complex", "bool")
_ALLOWED_GLOBALS = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {(m, "_reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")}
    | {(m, "scalar") for m in ("numpy.core.multiarray", "numpy._core.multiarray")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {(m, b) for m in ("builtins", "__builtin__") for b in _BUILTINS}
)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers, nothing executable."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]  # avoid numpy 2's deprecation shim
        return super().find_class(module, name)


def read_pickle(path: str | os.PathLike) -> Any:
    """Read a CIFAR-style python pickle safely (numpy arrays, lists, dicts, bytes only)."""
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise DataError(
            f"refusing to read {path}: {exc}; CIFAR batch files hold only numpy arrays, lists "
            "and dicts, so this file is corrupt or not a CIFAR file"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError, KeyError) as exc:
        raise DataError(f"cannot read {path} as a CIFAR python batch file: {exc!r}") from None


def _field(d: Any, key: str, path: Path) -> Any:
    """A field of a CIFAR batch dict, whose keys are bytes (python-2 pickles) or str."""
    if isinstance(d, dict):
        for k in (key.encode(), key):
            if k in d:
                return d[k]
    raise DataError(f"{path} has no {key!r} entry; expected a CIFAR python batch dict")


def _cifar_dir(name: str, root: str | None, download: bool) -> Path:
    layout = _CIFAR_LAYOUT[name]
    default = os.environ.get("AUTOPRUNE_DATA", "~/.cache/autoprune/data")
    base = Path(root if root is not None else default).expanduser()
    needed = layout["train"] + layout["test"] + [layout["meta"]]
    candidates = [base / layout["folder"], base]
    for _ in range(2):
        for d in candidates:
            if all((d / f).is_file() for f in needed):
                return d
        if not download:
            break
        _download_cifar(name, base)
        download = False
    raise DataError(
        f"{name} files not found: looked for {', '.join(needed)} in {candidates[0]} and {candidates[1]}; "
        "pass root=DIR pointing at the folder that holds "
        f"{layout['folder']}/, or download=True (--download on the command line) to fetch it there"
    )


def _download_cifar(name: str, base: Path) -> None:
    """Fetch the official archive into ``base`` with torchvision (reading stays ours)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(base), train=True, download=True)
    except Exception as exc:  # network failures come in many types
        raise DataError(f"downloading {name} into {base} failed: {exc}") from None


def _read_cifar_split(d: Path, files: list[str], layout: dict) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for fname in files:
        batch = read_pickle(d / fname)
        data = np.asarray(_field(batch, "data", d / fname))
        labels = np.asarray(_field(batch, layout["labels"], d / fname), dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataError(
                f"{d / fname}: expected uint8 data of shape (N, 3072) and N labels, "
                f"got data {data.dtype} {data.shape} and {len(labels)} labels"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= layout["num_classes"]):
            raise DataError(f"{d / fname}: labels must lie in [0, {layout['num_classes']}), "
                            f"got [{labels.min()}, {labels.max()}]")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _cifar_transforms(name: str, size: int) -> tuple[Callable, Callable]:
    from torchvision.transforms import v2

    mean, std = CIFAR_STATS[name]
    resize = [v2.Resize(size, antialias=True)] if size != 32 else []
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    train = v2.Compose(resize + [v2.RandomCrop(size, padding=max(1, size // 8)),
                                 v2.RandomHorizontalFlip()] + tail)
    return train, v2.Compose(resize + tail)


def _load_cifar(name: str, image_size: int | None, seed: int, root: str | None, download: bool,
                val_size: int = 5000) -> DataBundle:
    layout = _CIFAR_LAYOUT[name]
    d = _cifar_dir(name, root, download)
    x_train, y_train = _read_cifar_split(d, layout["train"], layout)
    x_test, y_test = _read_cifar_split(d, layout["test"], layout)
    meta = read_pickle(d / layout["meta"])
    names = _field(meta, layout["names"], d / layout["meta"])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    train_idx, val_idx = stratified_split(np.arange(len(y_train)), y_train.numpy(),
                                          sample_count(val_size, len(y_train), "val"), seed)
    size = 32 if image_size is None else image_size
    train_tf, eval_tf = _cifar_transforms(name, size)
    base = TensorDataset(x_train, y_train)
    parts = (TransformedSubset(base, train_idx, train_tf), TransformedSubset(base, val_idx, eval_tf),
             TransformedSubset(TensorDataset(x_test, y_test), range(len(y_test)), eval_tf))
    mean, std = CIFAR_STATS[name]
    settings = {"name": name, "image_size": size, "seed": seed, "val_size": val_size, "root": str(d),
                "mean": list(mean), "std": list(std), "augment": "random_crop+hflip",
                "sizes": split_sizes(*parts)}
    return DataBundle(*parts, num_classes=layout["num_classes"], input_shape=(3, size, size),
                      name=name, settings=settings, classes=classes)


def load_cifar10(image_size: int | None, seed: int, root: str | None, download: bool,
                  val_size: int = 5000) -> DataBundle:
    """CIFAR-10 from the python-pickle files in ``root``."""
    return _load_cifar("cifar10", image_size, seed, root, download, val_size)


def load_cifar100(image_size: int | None, seed: int, root: str | None, download: bool,
                   val_size: int = 5000) -> DataBundle:
    """CIFAR-100 (fine labels) from the python-pickle files in ``root``."""
    return _load_cifar("cifar100", image_size, seed, root, download, val_size)


# --------------------------------------------------------------------------- image folders


def _imagenet_transforms(size: int) -> tuple[Callable, Callable]:
    from torchvision.transforms import v2

    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor()]
    train = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True),
                        v2.RandomHorizontalFlip()] + tail)
    evaluate = v2.Compose([v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)] + tail)
    return train, evaluate


def _image_folder(path: Path) -> Any:
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(
            f"{path} is not a usable image folder (one sub-folder of images per class): {exc}"
        ) from None


def load_imagefolder(
    image_size: int | None, seed: int, root: str | None, download: bool, path: str = "",
    test_size: float | int = 0.2, val_size: float | int = 0.1,
) -> DataBundle:
    """Images in class sub-folders; ``train/`` + ``val/`` layouts use ``val/`` as the test set."""
    folder = Path(path).expanduser()
    if not path or not folder.is_dir():
        raise DataError(
            f"imagefolder: {str(folder)!r} is not a directory; use imagefolder:PATH with PATH holding "
            "one sub-folder per class (or train/ and val/ folders laid out that way)"
        )
    size = 224 if image_size is None else image_size
    train_tf, eval_tf = _imagenet_transforms(size)
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        base, test_base = _image_folder(folder / "train"), _image_folder(folder / "val")
        if base.classes != test_base.classes:
            raise DataError(f"imagefolder: train/ and val/ in {folder} hold different classes: "
                            f"{base.classes} vs {test_base.classes}")
        targets = np.asarray(base.targets)
        train_idx, val_idx = stratified_split(np.arange(len(targets)), targets,
                                              sample_count(val_size, len(targets), "val"), seed)
        test = TransformedSubset(test_base, range(len(test_base)), eval_tf)
        layout = "train/val"
    else:
        base = _image_folder(folder)
        train_idx, val_idx, test_idx = split_indices(base.targets, seed, test_size, val_size)
        test = TransformedSubset(base, test_idx, eval_tf)
        layout = "single"
    parts = (TransformedSubset(base, train_idx, train_tf),
             TransformedSubset(base, val_idx, eval_tf), test)
    settings = {"name": "imagefolder", "path": str(folder.resolve()), "layout": layout, "image_size": size,
                "seed": seed, "test_size": test_size if layout == "single" else None, "val_size": val_size,
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "sizes": split_sizes(*parts)}
    return DataBundle(*parts, num_classes=len(base.classes), input_shape=(3, size, size),
                      name=f"imagefolder:{folder}", settings=settings, classes=list(base.classes))
