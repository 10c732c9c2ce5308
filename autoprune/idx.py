"""IDX files (the MNIST / Fashion-MNIST format) and where Fashion-MNIST's four files are.

An IDX file is a 4-byte magic number — two zero bytes, a type code (``0x08``: unsigned
bytes) and the number of dimensions — then one big-endian int32 per dimension, then the
values in C order. Files may be gzipped. :func:`read_idx` checks every part of the header
against the file's real length before it allocates, so a damaged or hostile file is one
:class:`~autoprune.errors.DataError` line, never a huge allocation or a gzip bomb.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from .errors import DataError

UBYTE = 0x08
MAX_ITEMS = 10_000_000      # images in one file (Fashion-MNIST has 60,000)
MAX_SIDE = 4096             # rows / columns of one image
FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
ENV_VAR = "AUTOPRUNE_DATA"
SUBDIRS = ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")  # as given, ours, torchvision's


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """The unsigned-byte array of ``ndim`` dimensions in the IDX file ``path`` (gzipped or not)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[:2] != b"\0\0":
                raise DataError(f"{path} is not an IDX file (bad magic number); expected the "
                                "Fashion-MNIST/MNIST format")
            if head[2] != UBYTE or head[3] != ndim:
                raise DataError(f"{path}: IDX type 0x{head[2]:02x} with {head[3]} dimensions; expected "
                                f"unsigned bytes (0x08) with {ndim}")
            raw = f.read(4 * ndim)
            if len(raw) < 4 * ndim:
                raise DataError(f"{path} is truncated (incomplete IDX header)")
            shape = struct.unpack(f">{ndim}I", raw)
            if not 1 <= shape[0] <= MAX_ITEMS or any(not 1 <= s <= MAX_SIDE for s in shape[1:]):
                raise DataError(f"{path}: IDX shape {shape} is out of range (at most {MAX_ITEMS} items "
                                f"of at most {MAX_SIDE}x{MAX_SIDE})")
            count = int(np.prod(shape))
            data = f.read(count + 1)  # one byte more than the header promises: is there more?
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(data) != count:
        raise DataError(f"{path} holds {'more' if len(data) > count else 'fewer'} values than its "
                        f"IDX header says ({count}); the file is damaged")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    bases = [Path(root)] if root else []
    if os.environ.get(ENV_VAR):
        bases.append(Path(os.environ[ENV_VAR]))
    bases.append(SYSTEM_DIR)
    return [base / sub for base in bases for sub in SUBDIRS]


def _complete(folder: Path) -> dict[str, Path] | None:
    """The four files in ``folder`` (each gzipped or not), or None if one is missing."""
    found = {}
    for key, stem in FILES.items():
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def fashion_mnist_files(root: str | os.PathLike | None = None, download: bool = False) -> dict[str, Path]:
    """Paths of Fashion-MNIST's four IDX files: from ``root``, ``$AUTOPRUNE_DATA``,
    ``/usr/share/datasets/fashion-mnist`` (in that order), or downloaded into ``root``
    with torchvision when ``download`` is set. DataError naming all three ways if none has them."""
    for folder in _candidates(root):
        files = _complete(folder)
        if files is not None:
            return files
    if download:
        if not root:
            raise DataError("--download needs --data-root DIR to download Fashion-MNIST into")
        from torchvision.datasets import FashionMNIST
        try:
            FashionMNIST(str(root), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise DataError(f"downloading Fashion-MNIST into {root} failed: {type(exc).__name__}: "
                            f"{str(exc)[:120]}") from None
        files = _complete(Path(root) / "FashionMNIST" / "raw")
        if files is not None:
            return files
    raise DataError("Fashion-MNIST files not found (train-images-idx3-ubyte.gz and three more); get them "
                    "with 'apt-get install dataset-fashion-mnist' (into /usr/share/datasets/fashion-mnist), "
                    f"or put them in --data-root DIR or ${ENV_VAR}, or pass --download with --data-root DIR")
