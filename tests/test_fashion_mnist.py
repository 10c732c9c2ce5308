"""Fashion-MNIST from IDX files the tests write (never the real data): the reader, the file
search, the official split with a stratified validation set carved from train, and one-line
errors for damaged or missing files."""

import struct

import numpy as np
import pytest
import torch

import autoprune as ap
from autoprune import idx
from autoprune.errors import DataError
from conftest import idx_bytes as _idx_bytes, write_fake_fashion_mnist as _fake, write_idx as _write


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path / "nowhere")


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_recovers_the_array(tmp_path, gz):
    array = np.random.default_rng(1).integers(0, 256, size=(7, 3, 5), dtype=np.uint8)
    path = _write(tmp_path, "x-idx3-ubyte", array, gz)
    assert np.array_equal(idx.read_idx(path, 3), array)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"\x01\x02" + b[2:], "bad magic number"),
    (lambda b: b[:2] + b"\x0d" + b[3:], "expected unsigned bytes"),
    (lambda b: b[:3] + b"\x02" + b[4:], "with 2 dimensions"),
    (lambda b: b[:-5], "fewer values"),
    (lambda b: b + b"\0", "more values"),
    (lambda b: b[:6], "truncated"),
    (lambda b: b[:4] + struct.pack(">I", 4_000_000_000) + b[8:], "out of range"),
])
def test_damaged_idx_files_are_one_line(tmp_path, damage, message):
    array = np.zeros((4, 2, 2), dtype=np.uint8)
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(damage(_idx_bytes(array)))
    with pytest.raises(DataError, match=message) as info:
        idx.read_idx(path, 3)
    assert "\n" not in str(info.value)


def test_loads_the_official_split_with_a_stratified_validation_set(tmp_path, no_system_data):
    raw = _fake(tmp_path / "fm")
    data = ap.data.load("fashion-mnist", root=str(tmp_path / "fm"), seed=3, val_size=50, channels=3)
    assert data.num_classes == 10 and data.input_shape == (3, 28, 28)
    assert (len(data.train), len(data.val), len(data.test)) == (150, 50, 50)
    assert np.bincount(data.val.labels.numpy()).tolist() == [5] * 10  # stratified
    # the official test set, in order and unchanged (up to the train-statistics normalisation)
    assert torch.equal(data.test.labels, torch.from_numpy(raw["t10k"][1].astype(np.int64)))
    mean, std = data.settings["mean"][0], data.settings["std"][0]
    first = data.test.images[0, 0] * std + mean
    resized = torch.nn.functional.interpolate(torch.from_numpy(raw["t10k"][0][:1]).float().div(255)[None],
                                              size=(28, 28), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(first, resized, atol=1e-5)
    assert torch.equal(data.test.images[:, 0], data.test.images[:, 2])  # grayscale repeated
    # train statistics only: the train split is standardised, the test split is not exactly
    assert abs(float(data.train.images[:, 0].mean())) < 1e-4
    # every label stays with its image: pixel (0, 0) encodes the label, and bilinear upsampling
    # (align_corners=False) keeps the corner pixel exactly
    for part in (data.train, data.val, data.test):
        corner = part.images[:, 0, 0, 0] * std + mean
        assert torch.allclose(corner, part.labels.float() * 20 / 255, atol=1e-4)
    # val and train are disjoint and together the official train set
    rows = lambda part: {tuple(r) for r in part.images[:, 0].flatten(1).numpy().round(4).tolist()}  # noqa: E731
    assert not rows(data.train) & rows(data.val) and len(data.train) + len(data.val) == 200


def test_validation_depends_on_the_seed_and_train_size_subsets(tmp_path, no_system_data):
    _fake(tmp_path / "fm")
    a = ap.data.load("fashion-mnist", root=str(tmp_path / "fm"), seed=0, val_size=50, image_size=6)
    b = ap.data.load("fashion-mnist", root=str(tmp_path / "fm"), seed=1, val_size=50, image_size=6)
    assert not torch.equal(a.val.images, b.val.images)
    c = ap.data.load("fashion-mnist", root=str(tmp_path / "fm"), seed=0, val_size=50, train_size=100,
                     image_size=6, channels=1)
    assert len(c.train) == 100 and np.bincount(c.train.labels.numpy()).tolist() == [10] * 10
    assert c.input_shape == (1, 6, 6)


def test_files_are_found_in_data_root_env_var_or_the_system_folder(tmp_path, monkeypatch, no_system_data):
    _fake(tmp_path / "env" / "fashion-mnist", gz=False)
    monkeypatch.setenv(idx.ENV_VAR, str(tmp_path / "env"))
    assert idx.fashion_mnist_files()["train_images"].parent == tmp_path / "env" / "fashion-mnist"
    _fake(tmp_path / "root")
    assert idx.fashion_mnist_files(tmp_path / "root")["test_labels"].name == "t10k-labels-idx1-ubyte.gz"
    monkeypatch.delenv(idx.ENV_VAR)
    _fake(tmp_path / "system")
    monkeypatch.setattr(idx, "SYSTEM_DIR", tmp_path / "system")
    assert idx.fashion_mnist_files()["train_labels"].parent == tmp_path / "system"


def test_missing_files_name_every_way_to_get_them(tmp_path, no_system_data, capsys):
    from autoprune import cli

    folder = tmp_path / "partial"
    _fake(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()  # three of four files are not enough
    with pytest.raises(DataError) as info:
        idx.fashion_mnist_files(folder)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-root" in message
    assert f"${idx.ENV_VAR}" in message and "--download" in message
    status = cli.main(["train", "--model", "resnet20", "--data", "fashion-mnist", "--data-root", str(folder),
                       "--epochs", "1", "--out", str(tmp_path / "b.pt"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
    assert not (tmp_path / "b.pt").exists()
