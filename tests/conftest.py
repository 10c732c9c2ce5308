"""Shared test setup: slow-test switch, offline Ray, deterministic seeds."""

import os

import pytest
import torch

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))


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
