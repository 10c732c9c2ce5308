"""Datasets by name: ``digits`` and ``synthetic`` (offline, in memory), ``fashion-mnist``
(its IDX files, :mod:`autoprune.idx`), ``cifar10``, ``cifar100`` and ``imagefolder:PATH``
(user data on disk).

Every loader returns a :class:`DataBundle` with train/val/test splits fixed by ``seed``
and a JSON-able ``settings`` dict recording what was loaded (it goes into reports).
CIFAR batch files are read with a restricted unpickler, never plain ``pickle.load``.
"""

from __future__ import annotations

import difflib
import inspect
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .errors import DataError, short
from .limits import MAX_IMAGE_SIZE, check_fits

DATASET_NAMES = ("digits", "synthetic", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH")

CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


# --------------------------------------------------------------------------- public API


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


def split_indices(
    labels: Sequence[int] | np.ndarray,
    seed: int = 0,
    test: float | int = 0.2,
    val: float | int = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (train, val, test) index arrays; fractions are of the whole set."""
    labels = np.asarray(labels)
    n = len(labels)
    n_test, n_val = _count(test, n, "test"), _count(val, n, "val")
    if n_test + n_val >= n:
        raise DataError(f"test ({n_test}) + val ({n_val}) samples leave no training data out of {n}")
    rest, test_idx = _stratified_split(np.arange(n), labels, n_test, seed)
    train_idx, val_idx = _stratified_split(rest, labels[rest], n_val, seed)
    return train_idx, val_idx, test_idx


# --------------------------------------------------------------------------- helpers


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


def _count(size: float | int, n: int, what: str) -> int:
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


def _stratified_split(
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


def _standardise(x: torch.Tensor, train_idx: np.ndarray) -> tuple[torch.Tensor, list[float], list[float]]:
    """Normalise per channel with the train split's statistics (no test leakage)."""
    train = x[torch.as_tensor(train_idx)]
    mean = train.mean(dim=(0, 2, 3))
    std = train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    out = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return out, mean.tolist(), std.tolist()


def _in_memory_bundle(
    name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int,
    settings: dict[str, Any], test_size: float | int, val_size: float | int,
) -> DataBundle:
    """Split, normalise with train statistics and wrap in-memory tensors."""
    train_idx, val_idx, test_idx = split_indices(y.numpy(), seed, test_size, val_size)
    x, mean, std = _standardise(x, train_idx)
    parts = [LabeledTensors(x[torch.as_tensor(i, dtype=torch.long)].contiguous(),
                            y[torch.as_tensor(i, dtype=torch.long)].contiguous())
             for i in (train_idx, val_idx, test_idx)]
    settings = {**settings, "seed": seed, "test_size": test_size, "val_size": val_size,
                "mean": mean, "std": std, "sizes": _sizes(*parts)}
    return DataBundle(*parts, num_classes=num_classes, input_shape=tuple(x.shape[1:]),
                      name=name, settings=settings, classes=[str(c) for c in range(num_classes)])


def _sizes(train: Dataset, val: Dataset, test: Dataset) -> dict[str, int]:
    return {"train": len(train), "val": len(val), "test": len(test)}


def _check_in_memory(name: str, n: int, channels: int, size: int) -> None:
    """SizeError unless ``n`` float images of ``channels``x``size``x``size`` fit in memory
    (three copies live at once while resizing and normalising)."""
    check_fits(3 * 4 * n * channels * size * size, f"{name} at image size {size} ({n} images held in memory)",
               "use a smaller --image-size")


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- digits / synthetic


def _load_digits(
    image_size: int | None, seed: int, root: str | None, download: bool,
    channels: int = 3, test_size: float | int = 0.2, val_size: float | int = 0.1,
) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images), upsampled bilinearly."""
    from sklearn.datasets import load_digits

    if channels not in (1, 3):
        raise DataError(f"digits: channels must be 1 or 3, got {channels!r}")
    size = 16 if image_size is None else image_size
    images, labels = load_digits(return_X_y=True)
    _check_in_memory("digits", len(labels), channels, size)
    x = torch.from_numpy(images.astype(np.float32)).view(-1, 1, 8, 8)
    x = _resize(x, size).repeat(1, channels, 1, 1)
    y = torch.from_numpy(labels.astype(np.int64))
    settings = {"name": "digits", "image_size": size, "channels": channels}
    return _in_memory_bundle("digits", x, y, 10, seed, settings, test_size, val_size)


def _load_synthetic(
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
    _check_in_memory("synthetic", num_classes * n_per_class, channels, size)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=gen)
    protos = _resize(coarse, size)
    protos = protos - protos.mean(dim=(1, 2, 3), keepdim=True)
    protos = protos / protos.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = protos[y] + noise * torch.randn(len(y), channels, size, size, generator=gen)
    settings = {"name": "synthetic", "image_size": size, "num_classes": num_classes,
                "n_per_class": n_per_class, "channels": channels, "noise": noise}
    return _in_memory_bundle("synthetic", x, y, num_classes, seed, settings, test_size, val_size)


# --------------------------------------------------------------------------- Fashion-MNIST


def _load_fashion_mnist(
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
    from .idx import fashion_mnist_files, read_idx

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
    _check_in_memory("fashion-mnist", n_train + n_test, channels, size)
    y_train = labels["train"].astype(np.int64)
    rest, val_idx = _stratified_split(np.arange(n_train), y_train, _count(val_size, n_train, "val"), seed)
    if train_size is not None:
        keep = _count(train_size, len(rest), "train")
        _, rest = _stratified_split(rest, y_train[rest], keep, seed)
    x = torch.from_numpy(np.concatenate([images["train"], images["test"]])).float().div_(255).unsqueeze(1)
    x = _resize(x, size)
    x, mean, std = _standardise(x, rest)
    x = x.repeat(1, channels, 1, 1) if channels == 3 else x
    y = torch.from_numpy(np.concatenate([y_train, labels["test"].astype(np.int64)]))
    test_idx = np.arange(n_train, n_train + n_test)
    parts = [LabeledTensors(x[torch.as_tensor(i, dtype=torch.long)].contiguous(),
                            y[torch.as_tensor(i, dtype=torch.long)].contiguous())
             for i in (rest, val_idx, test_idx)]
    settings = {"name": "fashion-mnist", "image_size": size, "channels": channels, "seed": seed,
                "val_size": val_size, "train_size": train_size, "files": str(files["train_images"].parent),
                "mean": mean * channels, "std": std * channels, "sizes": _sizes(*parts)}
    return DataBundle(*parts, num_classes=10, input_shape=(channels, size, size), name="fashion-mnist",
                      settings=settings, classes=list(FASHION_MNIST_CLASSES))


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")


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
    train_idx, val_idx = _stratified_split(np.arange(len(y_train)), y_train.numpy(),
                                           _count(val_size, len(y_train), "val"), seed)
    size = 32 if image_size is None else image_size
    train_tf, eval_tf = _cifar_transforms(name, size)
    base = TensorDataset(x_train, y_train)
    parts = (TransformedSubset(base, train_idx, train_tf), TransformedSubset(base, val_idx, eval_tf),
             TransformedSubset(TensorDataset(x_test, y_test), range(len(y_test)), eval_tf))
    mean, std = CIFAR_STATS[name]
    settings = {"name": name, "image_size": size, "seed": seed, "val_size": val_size, "root": str(d),
                "mean": list(mean), "std": list(std), "augment": "random_crop+hflip",
                "sizes": _sizes(*parts)}
    return DataBundle(*parts, num_classes=layout["num_classes"], input_shape=(3, size, size),
                      name=name, settings=settings, classes=classes)


def _load_cifar10(image_size: int | None, seed: int, root: str | None, download: bool,
                  val_size: int = 5000) -> DataBundle:
    """CIFAR-10 from the python-pickle files in ``root``."""
    return _load_cifar("cifar10", image_size, seed, root, download, val_size)


def _load_cifar100(image_size: int | None, seed: int, root: str | None, download: bool,
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


def _load_imagefolder(
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
        train_idx, val_idx = _stratified_split(np.arange(len(targets)), targets,
                                               _count(val_size, len(targets), "val"), seed)
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
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "sizes": _sizes(*parts)}
    return DataBundle(*parts, num_classes=len(base.classes), input_shape=(3, size, size),
                      name=f"imagefolder:{folder}", settings=settings, classes=list(base.classes))


_LOADERS: dict[str, Callable[..., DataBundle]] = {
    "digits": _load_digits,
    "synthetic": _load_synthetic,
    "fashion-mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagefolder": _load_imagefolder,
}
