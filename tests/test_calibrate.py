"""Calibration taps, streaming-memory bound, caching, and criterion mixes."""

import numpy as np
import pytest
import torch

import autoprune as ap
from autoprune import criteria
from autoprune.calibrate import calibrate
from autoprune.criteria.base import Criterion


class _Recorder(Criterion):
    """Test criterion: keeps the first batch's maps and grads (unregistered: no name)."""

    tap = "post"
    extra_taps = ("pre",)
    needs_grad = True

    def init(self, unit, space):
        return {}

    def update(self, unit, state, batch):
        state.setdefault("post", batch.maps[("post", unit.name)])
        state.setdefault("pre", batch.maps[("pre", unit.name)])
        state.setdefault("grad", batch.grads[("post", unit.name)])


_Recorder.name = "_recorder"


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=4).eval()
    space = ap.Space(model, torch.randn(1, 3, 16, 16))
    data = ap.data.load("synthetic", num_classes=4, n_per_class=32, image_size=16)
    return model, space, data


def _batches(data, n=4, size=16):
    return [(data.train.images[i * size:(i + 1) * size], data.train.labels[i * size:(i + 1) * size])
            for i in range(n)]


def test_taps_match_manual_hooks(setup):
    model, space, data = setup
    x, y = _batches(data, 1)[0]
    seen = {}
    h1 = model.layer1[0].conv1.register_forward_hook(lambda m, i, o: seen.setdefault("pre", o))
    h2 = model.layer1[0].conv2.register_forward_pre_hook(lambda m, i: seen.setdefault("post", i[0]))
    stats = calibrate(space, model, [(x, y)], criteria=[_Recorder()], n_images=16, progress=False)
    h1.remove(), h2.remove()
    state = stats["_recorder"]["layer1.0.conv1"]
    torch.testing.assert_close(state["pre"], seen["pre"].detach())
    torch.testing.assert_close(state["post"], seen["post"].detach())
    # gradient of the loss w.r.t. the tapped activation, recomputed independently
    xr = x.clone()
    act = {}
    h = model.layer1[0].conv2.register_forward_pre_hook(lambda m, i: act.setdefault("a", i[0]))
    loss = torch.nn.functional.cross_entropy(model(xr), y)
    h.remove()
    (g,) = torch.autograd.grad(loss, act["a"])
    torch.testing.assert_close(state["grad"], g)


def test_summary_size_independent_of_images(setup):
    model, space, data = setup
    names = [n for n in criteria.available() if criteria.get(n).taps() and n != "fpar"]
    assert {"di", "hrank", "hpse"} <= set(names)
    names = [(n, {"num_classes": 4}) if n == "di" else n for n in names]
    small = calibrate(space, model, _batches(data, 4), criteria=names, n_images=32, progress=False)
    large = calibrate(space, model, _batches(data, 4), criteria=names, n_images=64, progress=False)
    assert small.settings["n_images"] == 32 and large.settings["n_images"] == 64
    assert small.nbytes() == large.nbytes() > 0


def test_cache_reuses_stats(setup, tmp_path):
    model, space, data = setup
    consumed = []

    def counting():
        for b in _batches(data, 4):
            consumed.append(1)
            yield b

    first = calibrate(space, model, counting(), criteria=["l1", "hrank"], n_images=48,
                      progress=False, cache_dir=tmp_path)
    n_first = len(consumed)
    again = calibrate(space, model, counting(), criteria=["l1", "hrank"], n_images=48,
                      progress=False, cache_dir=tmp_path)
    assert len(consumed) - n_first == 1  # only the first batch, for the key
    for unit, state in first["hrank"].items():
        for k, v in state.items():
            torch.testing.assert_close(again["hrank"][unit][k], v)
    model2 = ap.models.create("resnet20", num_classes=4)
    other = calibrate(space, model2, counting(), criteria=["l1", "hrank"], n_images=48,
                      progress=False, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("stats-*.pt"))) == 2 and other is not None


def test_mix_with_single_weight_reproduces_ranking(setup):
    model, space, data = setup
    l1 = criteria.score("l1", space)
    rnd = criteria.score("random", space, seed=3)
    mixed = criteria.mix({"l1": 1.0, "random": 0.0}, {"l1": l1, "random": rnd})
    for unit in space.unit_names:
        assert torch.equal(torch.argsort(mixed[unit]), torch.argsort(l1[unit].double()))


def test_mix_is_weighted_rank_sum():
    a = {"u": torch.tensor([3.0, 1.0, 2.0])}
    b = {"u": torch.tensor([10.0, 30.0, 20.0])}
    out = criteria.mix({"a": 0.25, "b": 0.75}, {"a": a, "b": b})["u"]
    torch.testing.assert_close(out, torch.tensor([0.25, 0.75, 0.5], dtype=torch.double))
    torch.testing.assert_close(criteria.rank_normalise(torch.tensor([1.0, 1.0, 5.0])),
                               torch.tensor([0.25, 0.25, 1.0], dtype=torch.double))
    with pytest.raises(ValueError):
        criteria.mix({"a": -1.0}, {"a": a})


def test_unknown_criterion_suggests(setup):
    with pytest.raises(ap.AutopruneError, match="did you mean"):
        criteria.get("l11")


def test_weight_criteria_known_answers():
    """L1/L2 of constructed filters (channel c has every weight c+1) and |gamma| of the BN."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1, bias=False), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 2 * 2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 3, 1, 1))
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.1]))
    space = ap.Space(model.eval(), torch.zeros(1, 3, 2, 2))
    (unit,) = space.units
    c = np.arange(1.0, 5.0)
    assert np.allclose(criteria.score("l1", space)[unit.name].numpy(), 3 * c)
    assert np.allclose(criteria.score("l2", space)[unit.name].numpy(), np.sqrt(3) * c)
    assert np.allclose(criteria.score("bn_scale", space)[unit.name].numpy(), [0.5, 2.0, 1.0, 0.1])
