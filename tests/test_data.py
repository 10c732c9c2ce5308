"""Tests for autoprune.data: splits, normalisation, determinism and on-disk formats."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from autoprune import data
from autoprune.errors import DataError


def labels_of(ds) -> np.ndarray:
    return np.array([ds[i][1] for i in range(len(ds))])


@pytest.fixture(scope="module")
def digits() -> data.DataBundle:
    return data.load("digits", seed=0)


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_split_sizes(digits: data.DataBundle) -> None:
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797
    assert sizes[2] == round(0.2 * 1797) and sizes[1] == round(0.1 * 1797)
    image, label = digits.train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16) == digits.input_shape
    assert isinstance(label, int) and digits.num_classes == 10
    assert digits.settings["sizes"] == {"train": sizes[0], "val": sizes[1], "test": sizes[2]}
    json.dumps(digits.settings)


def test_digits_options_channels_and_size() -> None:
    bundle = data.load("digits", image_size=8, channels=1)
    assert bundle.input_shape == (1, 8, 8) and bundle.train[0][0].shape == (1, 8, 8)


@pytest.mark.parametrize("seed", [0, 3])
def test_digits_splits_are_stratified(seed: int) -> None:
    bundle = data.load("digits", seed=seed)
    splits = [bundle.train.labels.numpy(), bundle.val.labels.numpy(), bundle.test.labels.numpy()]
    totals = np.bincount(np.concatenate(splits), minlength=10)
    for split in splits:
        expected = totals * len(split) / totals.sum()
        assert np.abs(np.bincount(split, minlength=10) - expected).max() <= 1.0


def test_digits_splits_cover_every_sample(digits: data.DataBundle) -> None:
    from sklearn.datasets import load_digits

    raw_counts = np.bincount(load_digits().target)
    all_labels = np.concatenate([digits.train.labels, digits.val.labels, digits.test.labels])
    assert (np.bincount(all_labels) == raw_counts).all()


def test_digits_determinism(digits: data.DataBundle) -> None:
    again = data.load("digits", seed=0)
    for a, b in [(digits.train, again.train), (digits.val, again.val), (digits.test, again.test)]:
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    other = data.load("digits", seed=1)
    assert not torch.equal(digits.test.labels, other.test.labels)


def test_digits_normalised_with_train_statistics(digits: data.DataBundle) -> None:
    train = digits.train.images
    assert train.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (train.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    # val/test use the train statistics, so they are not exactly standardised
    assert digits.test.images.mean().abs() > 1e-5


def test_loader_order_is_seeded(digits: data.DataBundle) -> None:
    def order(seed: int) -> torch.Tensor:
        return torch.cat([y for _, y in data.loader(digits.val, batch_size=32, shuffle=True, seed=seed)])

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    batch_x, batch_y = next(iter(data.loader(digits.val, batch_size=8)))
    assert batch_x.shape == (8, 3, 16, 16) and batch_y.dtype == torch.int64


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_separable_by_class_means() -> None:
    bundle = data.load("synthetic", num_classes=5, n_per_class=40, seed=2)
    assert bundle.num_classes == 5 and bundle.input_shape == (3, 16, 16)
    assert len(bundle.train) + len(bundle.val) + len(bundle.test) == 200
    x, y = bundle.train.images.flatten(1), bundle.train.labels
    means = torch.stack([x[y == c].mean(0) for c in range(5)])
    predicted = torch.cdist(bundle.test.images.flatten(1), means).argmin(1)
    assert (predicted == bundle.test.labels).float().mean() >= 0.95


def test_synthetic_seed_changes_data() -> None:
    a = data.load("synthetic", seed=0, image_size=8)
    b = data.load("synthetic", seed=0, image_size=8)
    c = data.load("synthetic", seed=1, image_size=8)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)


# --------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError, match=r"did you mean 'cifar10'.*digits.*imagefolder:PATH"):
        data.load("cifar11")


def test_unknown_option_is_named() -> None:
    with pytest.raises(DataError, match=r"'digits'.*'chanels'.*'channels'"):
        data.load("digits", chanels=1)


# --------------------------------------------------------------------------- CIFAR (fake files)


def write_fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> dict:
    """Real on-disk format (bytes keys, uint8 rows of 3072) with a few random images."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"filenames": [f"img{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        written[name] = batch
    names = [f"class{i}".encode() for i in range(10)]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def unnormalise(image: torch.Tensor, bundle: data.DataBundle) -> torch.Tensor:
    mean = torch.tensor(bundle.settings["mean"]).view(3, 1, 1)
    std = torch.tensor(bundle.settings["std"]).view(3, 1, 1)
    return image * std + mean


def test_cifar10_reads_real_format_and_round_trips_pixels(tmp_path: Path) -> None:
    written = write_fake_cifar10(tmp_path)
    bundle = data.load("cifar10", root=str(tmp_path), val_size=5, seed=0)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, 6)
    assert bundle.num_classes == 10 and bundle.input_shape == (3, 32, 32)
    assert bundle.classes == [f"class{i}" for i in range(10)]
    test = written["test_batch"]
    for i in range(len(bundle.test)):
        image, label = bundle.test[i]
        assert image.shape == (3, 32, 32) and label == test[b"labels"][i]
        pixels = (unnormalise(image, bundle) * 255).round().to(torch.uint8)
        assert torch.equal(pixels, torch.from_numpy(test[b"data"][i].reshape(3, 32, 32)))
    train_rows = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)])
    train_labels = sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    for pos, idx in enumerate(bundle.val.indices):  # val: held-out train images, no augmentation
        image, label = bundle.val[pos]
        assert label == train_labels[idx]
        pixels = (unnormalise(image, bundle) * 255).round().to(torch.uint8)
        assert torch.equal(pixels, torch.from_numpy(train_rows[idx].reshape(3, 32, 32)))
    assert not set(bundle.val.indices) & set(bundle.train.indices)
    json.dumps(bundle.settings)


def test_cifar10_train_augmentation_and_resize(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    bundle = data.load("cifar10", root=str(tmp_path), val_size=5, image_size=16)
    assert bundle.input_shape == (3, 16, 16)
    torch.manual_seed(0)
    views = torch.stack([bundle.train[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 16, 16)
    assert any(not torch.equal(views[0], v) for v in views[1:]), "random crop/flip should vary"
    pixel = unnormalise(views[0], bundle)
    assert pixel.min() >= -1e-5 and pixel.max() <= 1 + 1e-5
    assert torch.equal(bundle.test[0][0], bundle.test[0][0])  # eval transform is deterministic


def test_cifar100_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, labels in [("train", [8 * i for i in range(12)]), ("test", [99, 0, 57])]:
        n = len(labels)
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"fine_labels": labels, b"coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    bundle = data.load("cifar100", root=str(tmp_path), val_size=2)
    assert bundle.num_classes == 100 and len(bundle.classes) == 100
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (10, 2, 3)
    assert labels_of(bundle.test).tolist() == [99, 0, 57]


def test_python2_era_numpy_core_globals_are_accepted(tmp_path: Path) -> None:
    # The official files reference numpy.core.multiarray, which numpy 2 renamed to numpy._core.
    arr = np.arange(3072, dtype=np.uint16).astype(np.uint8).reshape(1, 3072)
    raw = pickle.dumps({b"data": arr, b"labels": [3]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (tmp_path / "batch").write_bytes(raw)
    loaded = data.read_pickle(tmp_path / "batch")
    assert np.array_equal(loaded[b"data"], arr) and loaded[b"labels"] == [3]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_disallowed_global_is_refused(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {b"data": _Exploit(marker), b"labels": [0]}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_3.*(posix|os)\.system"):
        data.load("cifar10", root=str(tmp_path), val_size=2)
    assert not marker.exists()


def test_cifar_missing_files_explain_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py.*download=True"):
        data.load("cifar10", root=str(tmp_path))
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        data.load("cifar10", root=str(tmp_path), val_size=2)


def test_cifar_val_size_too_large(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path)
    with pytest.raises(DataError, match="val_size"):
        data.load("cifar10", root=str(tmp_path))  # default 5000 > 20 fake train images


# --------------------------------------------------------------------------- image folders

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def write_pngs(folder: Path, per_class: int) -> None:
    from PIL import Image

    for cls, colour in COLOURS.items():
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12 + i % 3, 10), colour).save(folder / cls / f"{i}.png")


def class_colour(image: torch.Tensor) -> str:
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean).mean(dim=(1, 2)) * 255
    distance = {c: (rgb - torch.tensor(v, dtype=torch.float32)).abs().sum().item() for c, v in COLOURS.items()}
    return min(distance, key=distance.get)


def test_imagefolder_single_folder_split(tmp_path: Path) -> None:
    write_pngs(tmp_path / "imgs", per_class=10)
    bundle = data.load(f"imagefolder:{tmp_path / 'imgs'}", image_size=8, seed=0)
    assert bundle.num_classes == 3 and bundle.classes == sorted(COLOURS)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (21, 3, 6)
    assert np.bincount(labels_of(bundle.test), minlength=3).tolist() == [2, 2, 2]
    for i in range(len(bundle.test)):
        image, label = bundle.test[i]
        assert image.shape == (3, 8, 8) and class_colour(image) == bundle.classes[label]
    assert bundle.train[0][0].shape == (3, 8, 8)
    assert bundle.settings["layout"] == "single"
    json.dumps(bundle.settings)


def test_imagefolder_train_val_layout(tmp_path: Path) -> None:
    write_pngs(tmp_path / "train", per_class=10)
    write_pngs(tmp_path / "val", per_class=2)
    bundle = data.load(f"imagefolder:{tmp_path}", image_size=8)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (27, 3, 6)
    assert sorted(labels_of(bundle.test)) == [0, 0, 1, 1, 2, 2]
    assert bundle.settings["layout"] == "train/val" and bundle.input_shape == (3, 8, 8)


def test_imagefolder_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        data.load(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="image folder"):
        data.load(f"imagefolder:{tmp_path / 'empty'}")
