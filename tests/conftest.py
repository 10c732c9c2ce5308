"""Shared test setup: slow-test switch, offline Ray, deterministic seeds, tiny Fashion-MNIST files."""

import gzip
import os
import signal
import struct

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Threads per process, set deliberately: the suite runs as 2 pytest-xdist workers on the 2-core
# machine (`-n 2`, see .ci/run), one torch thread each (two processes of 2 threads each were
# ~10x slower); a plain `pytest` run in one process uses up to 2.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // _workers))

# A suite started in the background by a non-interactive shell (`.ci/run &`) inherits SIGINT
# ignored, and Python then raises no KeyboardInterrupt: the Ctrl-C tests need Python's default
# handler (their subprocesses then start with SIGINT's default disposition too).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def trained(trained_once):
    """A private copy of the trained ResNet-20 (a test that changes it, e.g. its BN statistics,
    cannot change what later tests see) and the shared data."""
    import copy

    model, data = trained_once
    return copy.deepcopy(model).eval(), data


@pytest.fixture(scope="session")
def trained_once():
    """A ResNet-20 trained 3 epochs on 8x8 digits (about 90% accuracy), trained once per session."""
    import autoprune as ap
    from autoprune.train import train

    torch.manual_seed(0)
    data = ap.data.load("digits", image_size=8)
    model = ap.models.create("resnet20", num_classes=10)
    train(model, data, epochs=3, progress=False)
    return model.eval(), data


# --------------------------------------------------------------------------- Fashion-MNIST IDX files
# Plain functions (tests import them: ``from conftest import write_fake_fashion_mnist``).


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (unsigned bytes) in the IDX format: magic number, big-endian shape, values."""
    return b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(folder, name, array, gz=True):
    """``array`` as the IDX file ``folder/name`` (``.gz`` appended when gzipped); its path."""
    data = idx_bytes(array.astype(np.uint8))
    path = folder / (f"{name}.gz" if gz else name)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_fake_fashion_mnist(folder, n_train=200, n_test=50, side=6, gz=True, seed=0):
    """Four tiny IDX files; each image's pixels encode (class, index) so they can be traced."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        images[:, 0, 0] = labels * 20  # a pixel that carries the label
        write_idx(folder, f"{split}-images-idx3-ubyte", images, gz)
        write_idx(folder, f"{split}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


@pytest.fixture
def prune_call(monkeypatch):
    """``prune_call(argv)``: the keyword arguments ``autoprune prune argv`` hands to
    :func:`autoprune.prune` (model and data building and the prune itself stubbed out)."""
    import importlib

    from autoprune import cli, commands

    class Reached(Exception):
        pass

    def fake_prune(model, data, budget, **kw):
        raise Reached(kw)

    monkeypatch.setattr(commands, "_prune_inputs", lambda args: (None, None))
    monkeypatch.setattr(importlib.import_module("autoprune.prune"), "prune", fake_prune)

    def call(argv):
        with pytest.raises(Reached) as info:
            cli.main(argv)
        return info.value.args[0]
    return call
