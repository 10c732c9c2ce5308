"""DI criteria: known answers for the pooled closed form, the full-map form and the
end-to-end calibrate → score path."""

import numpy as np
import pytest
import torch
from torch import nn

import autoprune.criteria as criteria
from autoprune.calibrate import calibrate
from autoprune.criteria.base import Batch
from autoprune.criteria.di import (DI, delta_di, delta_di_from_scatter, di,
                                   di_from_scatter, fullmap_channel_grads, fullmap_di,
                                   scatter_from_summary, summarise)
from autoprune.space import Space, Unit


def numpy_scatters(x, y):
    """Total and between-class scatter written out directly."""
    x = np.asarray(x, dtype=np.float64)
    mu = x.mean(0)
    xc = x - mu
    total = xc.T @ xc
    between = np.zeros_like(total)
    for cls in np.unique(y):
        d = x[y == cls].mean(0) - mu
        between += (y == cls).sum() * np.outer(d, d)
    return total, between


def numpy_di(x, y, rho):
    total, between = numpy_scatters(x, y)
    return float(np.trace(np.linalg.solve(total + rho * np.eye(len(total)), between)))


def class_channel_data(n=240, c=6, carrier=2, classes=3, hw=None, seed=0):
    """Features (or maps when ``hw``) where only channel ``carrier`` depends on the class."""
    g = np.random.default_rng(seed)
    y = g.integers(0, classes, n)
    shape = (n, c) if hw is None else (n, c, hw, hw)
    x = g.normal(size=shape) * g.uniform(0.5, 2.0, size=c).reshape((1, c) + (1,) * (len(shape) - 2))
    offset = (y - (classes - 1) / 2) * 1.5
    x[:, carrier] += offset.reshape((n,) + (1,) * (len(shape) - 2))
    return x, y


# ------------------------------------------------------------------ pooled form, pure maths

def test_di_matches_independent_numpy_formula():
    g = np.random.default_rng(1)
    x = g.normal(size=(200, 7)) + g.normal(size=(1, 7))
    y = g.integers(0, 4, 200)
    x[:, 0] += y  # some class signal
    for rho in (1e-3, 0.5, 10.0):
        assert di(x, y, rho) == pytest.approx(numpy_di(x, y, rho), rel=1e-10)
    total, _ = numpy_scatters(x, y)
    assert di(x, y) == pytest.approx(numpy_di(x, y, 1e-3 * np.trace(total) / 7), rel=1e-10)
    # maps are global-average-pooled first
    maps = g.normal(size=(50, 3, 4, 4))
    ym = np.arange(50) % 2
    assert di(maps, ym, 0.1) == pytest.approx(numpy_di(maps.mean((2, 3)), ym, 0.1), rel=1e-10)
    assert di(torch.from_numpy(x), torch.from_numpy(y), 0.5) == pytest.approx(numpy_di(x, y, 0.5), rel=1e-10)


@pytest.mark.parametrize("rho", [1e-4, 1e-2, 3.0])
def test_delta_di_closed_form_equals_brute_force(rho):
    g = np.random.default_rng(2)
    x = g.normal(size=(150, 9)) @ g.normal(size=(9, 9))  # correlated channels
    y = g.integers(0, 3, 150)
    x[:, 4] += 2 * y
    x[:, 7] -= y
    closed = delta_di(x, y, rho)
    full = numpy_di(x, y, rho)
    brute = np.array([full - numpy_di(np.delete(x, c, axis=1), y, rho) for c in range(9)])
    assert isinstance(closed, np.ndarray) and closed.shape == (9,)
    assert np.all(brute > 0)  # DI never decreases when a feature is added
    np.testing.assert_allclose(closed, brute, rtol=1e-6)
    # subset interface (for the greedy optimiser): scores of a kept subset
    total, between = scatter_from_summary(summarise(x, y))
    keep = [0, 2, 4, 7]
    sub = delta_di_from_scatter(total, between, rho, keep=keep).numpy()
    sub_full = numpy_di(x[:, keep], y, rho)
    sub_brute = [sub_full - numpy_di(np.delete(x[:, keep], i, axis=1), y, rho) for i in range(4)]
    np.testing.assert_allclose(sub, sub_brute, rtol=1e-6)
    assert di_from_scatter(total, between, rho, keep=keep) == pytest.approx(sub_full, rel=1e-10)


def test_class_carrying_channel_scores_highest_pooled():
    x, y = class_channel_data(carrier=2)
    scores = delta_di(x, y)
    assert int(np.argmax(scores)) == 2
    assert scores[2] > 20 * np.delete(scores, 2).max()


def test_single_class_raises():
    x = np.random.default_rng(3).normal(size=(20, 4))
    with pytest.raises(ValueError, match="≥2 classes"):
        di(x, np.full(20, 5))
    with pytest.raises(ValueError, match="≥2 classes"):
        delta_di(x, np.zeros(20, dtype=int))


# ------------------------------------------------------------------ full-map form, pure maths

def test_fullmap_sample_space_identity_and_gradient():
    g = np.random.default_rng(4)
    rho = 0.3
    for n, c, hw in ((30, 5, 2), (80, 6, 1)):  # D = 20 < N and D = 6 < N; D > N below
        maps = torch.from_numpy(g.normal(size=(n, c, hw, hw)))
        y = torch.from_numpy(g.integers(0, 3, n))
        flat = maps.reshape(n, -1).numpy()
        # scaled labels: exactly the feature-space DI of the flattened maps
        assert float(fullmap_di(maps, y, rho, scaled_labels=True)) == pytest.approx(
            numpy_di(flat, y.numpy(), rho), rel=1e-9)
        # centred one-hot: tr[(S̄+ρI)⁻¹ X̄ᵀȲȲᵀX̄]
        total, _ = numpy_scatters(flat, y.numpy())
        xc = flat - flat.mean(0)
        yc = np.eye(3)[y.numpy()]
        yc = yc - yc.mean(0)
        m = np.linalg.inv(total + rho * np.eye(len(total)))
        assert float(fullmap_di(maps, y, rho)) == pytest.approx(
            np.trace(m @ xc.T @ yc @ yc.T @ xc), rel=1e-9)
        # autograd mask gradient = 2ρ Σ_{j in channel c} (M S_B M)_jj (scaled labels)
        _, between = numpy_scatters(flat, y.numpy())
        expected = 2 * rho * np.diag(m @ between @ m).reshape(c, hw * hw).sum(1)
        grads = fullmap_channel_grads(maps, y, rho, scaled_labels=True)
        np.testing.assert_allclose(grads.numpy(), expected, rtol=1e-7)
    # D ≫ N: gradient against the sample-space closed form 2ρ‖X̄_cᵀ(K+ρI)⁻¹Ȳ‖²
    n, c, hw = 24, 4, 5
    maps = torch.from_numpy(g.normal(size=(n, c, hw, hw)))
    y = torch.from_numpy(np.arange(n) % 3)
    xc = maps.numpy() - maps.numpy().mean(0)
    flat = xc.reshape(n, -1)
    yc = np.eye(3)[y.numpy()]
    yc = yc - yc.mean(0)
    gmat = np.linalg.solve(flat @ flat.T + 0.1 * np.eye(n), yc)
    expected = [2 * 0.1 * np.sum((xc[:, k].reshape(n, -1).T @ gmat) ** 2) for k in range(c)]
    np.testing.assert_allclose(fullmap_channel_grads(maps, y, 0.1).numpy(), expected, rtol=1e-7)


def test_fullmap_ranks_class_channel_first():
    maps, y = class_channel_data(n=96, c=6, carrier=4, classes=2, hw=6, seed=5)
    grads = fullmap_channel_grads(torch.from_numpy(maps), torch.from_numpy(y))
    assert int(torch.argmax(grads)) == 4
    pooled = delta_di(maps, y)
    assert int(np.argmax(pooled)) == 4  # same ranking at the top


# ------------------------------------------------------------------ streaming summaries

def test_streaming_two_batches_equal_one_concatenated():
    g = np.random.default_rng(6)
    c = 5
    unit = Unit("u", c, 1, 1, 1, ("u",))
    maps = torch.from_numpy(g.normal(size=(70, c, 3, 3))).float()
    labels = torch.tensor([0, 1] * 20 + [2, 0, 1] * 10)  # class 2 appears only in batch 2
    crit = DI()
    two, one = crit.init(unit, None), crit.init(unit, None)
    assert two["counts"].numel() == 0  # grows lazily
    for part in (slice(0, 40), slice(40, 70)):
        crit.update(unit, two, Batch({("pre", "u"): maps[part]}, {}, labels[part]))
    crit.update(unit, one, Batch({("pre", "u"): maps}, {}, labels))
    for key in one:
        assert two[key].shape == one[key].shape
        torch.testing.assert_close(two[key], one[key], rtol=1e-12, atol=1e-12)
    assert two["counts"].tolist() == [20.0 + 10, 20.0 + 10, 10.0]
    stats = criteria.Stats({"di": {"u": two}})
    stats_one = criteria.Stats({"di": {"u": one}})

    class _Space:
        units = [unit]

    s_two = crit.score(_Space(), stats)["u"]
    s_one = crit.score(_Space(), stats_one)["u"]
    assert torch.max(torch.abs(s_two - s_one)) < 1e-9
    # and the summaries reproduce the pure function on the concatenated data
    np.testing.assert_allclose(s_one.numpy(), delta_di(maps.double().numpy(), labels.numpy()), rtol=1e-9)


def test_num_classes_param_fixes_size_and_rejects_larger_labels():
    unit = Unit("u", 3, 1, 1, 1, ("u",))
    crit = DI(num_classes=4)
    state = crit.init(unit, None)
    assert state["class_sums"].shape == (1, 4, 3)  # one slice per writer layer of the unit
    crit.update(unit, state, Batch({("pre", "u"): torch.randn(6, 3)}, {}, torch.tensor([0, 1, 3, 0, 1, 3])))
    with pytest.raises(ValueError, match="num_classes"):
        crit.update(unit, state, Batch({("pre", "u"): torch.randn(2, 3)}, {}, torch.tensor([4, 0])))


# ------------------------------------------------------------------ end to end

CARRIER = 4


def _toy_model():
    """conv→bn→relu→conv→bn→relu→pool→fc; channel CARRIER of conv 0 averages input
    channel 0 (which holds the class); the other channels only see input channels 1-2."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():
        w = model[0].weight
        w.normal_(0, 0.3)
        w[:, 0] = 0
        w[CARRIER] = 0
        w[CARRIER, 0] = 1 / 9
    return model.eval()


def _batches(n_batches=4, size=32, single_class=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.zeros(size, dtype=torch.long) if single_class else torch.randint(0, 2, (size,), generator=g)
        x = torch.randn(size, 3, 8, 8, generator=g)
        x[:, 0] += (2 * y - 1).float().view(-1, 1, 1)
        out.append((x, y))
    return out


def test_end_to_end_calibrate_and_score():
    assert {"di", "di_fullmap"} <= set(criteria.available())
    model = _toy_model()
    space = Space(model, torch.randn(1, 3, 8, 8))
    assert space.unit_names[0] == "0"
    stats = calibrate(space, model, _batches(), criteria=["di", "di_fullmap"], progress=False)
    state = stats.of("di")["0"]
    assert state["second"].shape == (1, 6, 6) and state["counts"].sum() == 128  # one writer
    for name in ("di", "di_fullmap"):
        scores = criteria.score(name, space, stats)
        assert set(scores) == set(space.unit_names)
        assert all(s.shape == (u.width,) for u, s in zip(space.units, scores.values()))
        assert int(torch.argmax(scores["0"])) == CARRIER, (name, scores["0"])
        assert torch.all(scores["0"] >= 0)
    # the pooled score equals the pure function on the tapped, pooled maps
    with torch.no_grad():
        xs = torch.cat([x for x, _ in _batches()])
        ys = torch.cat([y for _, y in _batches()])
        pooled = model[0](xs).double().mean((2, 3))
    np.testing.assert_allclose(criteria.score("di", space, stats)["0"].numpy(),
                               delta_di(pooled.numpy(), ys.numpy()), rtol=1e-6)


def test_end_to_end_single_class_raises():
    model = _toy_model()
    space = Space(model, torch.randn(1, 3, 8, 8))
    stats = calibrate(space, model, _batches(2, 16, single_class=True),
                      criteria=["di", "di_fullmap"], progress=False)
    for name in ("di", "di_fullmap"):
        with pytest.raises(ValueError, match="≥2 classes"):
            criteria.score(name, space, stats)
