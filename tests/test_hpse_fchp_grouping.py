"""HPSE and FCHP criteria, cluster-aware grouping (hpse, fchp, sg) and the shared k-means."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score
from torch import nn

import autoprune as ap
from autoprune.criteria import Batch, Stats
from autoprune.criteria.fchp import FCHP, discriminative, next_unit, pearson, svd_content
from autoprune.criteria.hpse import HPSE, edge_scores, edge_shape_maps
from autoprune.grouping import cluster, importance_vectors, kmeans, kmeans_batched
from autoprune.space import Unit


def checkerboard(h, w):
    return (-1.0) ** (torch.arange(h)[:, None] + torch.arange(w)[None, :])


def smooth(h, w):
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.exp(-(xx ** 2 + yy ** 2))


def unit(name, width, consumers=()):
    return Unit(name, width, 1, 1, 1, (name,), (), consumers)


class Tiny(nn.Module):
    """conv1 (1×1, hand-set) → BN → ReLU → conv2 → BN → ReLU → pool → fc."""

    def __init__(self, c_in=2, width=4, k1=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, k1, padding=k1 // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------- HPSE

def test_edge_maps_known_answer():
    maps = torch.stack([checkerboard(8, 8), torch.ones(8, 8)])[None]  # [1, 2, 8, 8]
    edge, shape = edge_shape_maps(maps)
    e = edge_scores(maps)[0]
    # checkerboard: |Dx| = |Dy| = 2 inside; on the last column/row the replicated tap gives 0
    assert e[0].item() == pytest.approx(49 * 2 * 2 ** 0.5 + 14 * 2, rel=1e-6)
    assert e[1].item() == 0  # constant: no edges at all, the border included
    assert shape[0, 1].allclose(torch.full((8, 8), 2 * 2 ** 0.5))  # [1, 1] doubles a flat map
    assert shape[0, 0, :7, :7].abs().max() < 1e-6  # and cancels an alternating one


def _edge_energy_numpy(m: np.ndarray) -> float:
    """HPSE's edge energy Σ_hw sqrt(Dx² + Dy²) of one map, 'same' size by replicating the
    last column/row (np.pad mode "edge"), recomputed in float64."""
    p = np.pad(m.astype(np.float64), ((0, 1), (0, 1)), mode="edge")
    dx = p[:-1, 1:] - p[:-1, :-1]
    dy = p[1:, :-1] - p[:-1, :-1]
    return float(np.sqrt(dx ** 2 + dy ** 2).sum())


def test_edge_score_of_constant_is_zero_and_step_matches_numpy():
    """Padding must not leak a map's level into its edges (zero padding scored a constant
    8x8 map of 3 at 46.2): a constant scores 0; one vertical step edge scores what the
    same formula gives in numpy, whatever constant is added to the map."""
    const = torch.full((1, 1, 8, 8), 3.0)
    assert edge_scores(const).item() == 0
    assert edge_shape_maps(const)[0].abs().max().item() == 0
    step = torch.zeros(8, 8)
    step[:, 5:] = 2.5  # one vertical step between columns 4 and 5
    want = _edge_energy_numpy(step.numpy())
    assert want == pytest.approx(8 * 2.5)  # |Dx| = 2.5 on column 4 of each of 8 rows
    for level in (0.0, 3.0, -7.0):
        got = edge_scores((step + level)[None, None]).item()
        assert got == pytest.approx(want, rel=1e-6, abs=1e-5)
    rng = np.random.default_rng(0)
    noisy = rng.normal(size=(6, 9)).astype(np.float32)  # a non-square random map too
    assert edge_scores(torch.from_numpy(noisy)[None, None]).item() == pytest.approx(
        _edge_energy_numpy(noisy), rel=1e-5)


def test_hpse_end_to_end_checkerboard_outscores_smooth():
    torch.manual_seed(0)
    model = Tiny().eval()
    with torch.no_grad():  # conv1 channels: checker, smooth, checker/2, smooth/2
        model.conv1.weight.zero_()
        model.conv1.weight[[0, 1, 2, 3], [0, 1, 0, 1], 0, 0] = torch.tensor([1.0, 1.0, 0.5, 0.5])
    space = ap.Space(model, torch.randn(1, 2, 8, 8))
    amp = torch.rand(24, 1, 1) + 0.5
    x = torch.stack([amp * checkerboard(8, 8), amp * smooth(8, 8)], 1)  # equal-ish energy per image
    batches = [(x[i:i + 8], torch.zeros(8, dtype=torch.long)) for i in range(0, 24, 8)]
    stats = ap.calibrate(space, model, batches, criteria=["hpse"], n_images=24, progress=False)
    s = ap.criteria.score("hpse", space, stats)["conv1"]
    assert s[0] > s[1] and s[2] > s[3] and s[2] > s[1]
    expected = edge_scores(model.conv1(x).detach()).mean(0)
    assert torch.allclose(s, expected.float(), rtol=1e-5)
    assert float(stats["hpse"]["conv1"]["n"]) == 24
    assert stats["hpse"]["conv1"]["votes"].shape == (4, 1)  # default k = max(1, 4 // 16)


def planted_shape_batch(n_img, groups, per_group, hw, seed):
    """Maps whose channels share their group's blob pattern; group g sits at energy level g+1."""
    g = torch.Generator().manual_seed(seed)
    c = groups * per_group
    truth = torch.arange(c) // per_group
    perm = torch.randperm(c, generator=g)
    truth = truth[perm]
    yy, xx = torch.meshgrid(torch.arange(hw).float(), torch.arange(hw).float(), indexing="ij")
    centres = torch.tensor([[2.5, 2.5], [2.5, 8.5], [8.5, 2.5], [8.5, 8.5]])[:groups]
    maps = torch.empty(n_img, c, hw, hw)
    for i in range(n_img):
        jitter = centres + torch.randn(groups, 2, generator=g)
        pats = torch.exp(-((yy - jitter[:, :1, None]) ** 2 + (xx - jitter[:, 1:, None]) ** 2) / 6)
        level = (truth + 1).float()[:, None, None]
        amp = 0.9 + 0.2 * torch.rand(c, 1, 1, generator=g)
        maps[i] = level * amp * pats[truth] + 0.05 * torch.randn(c, hw, hw, generator=g)
    return maps, truth.numpy()


def test_hpse_recovers_planted_shape_groups():
    maps, truth = planted_shape_batch(16, 4, 8, 12, seed=1)
    u = unit("u", 32)
    space = SimpleNamespace(units=[u])
    crit = HPSE(k=4)
    state = crit.init(u, space)
    for i in range(0, 16, 4):
        crit.update(u, state, Batch({("pre", "u"): maps[i:i + 4]}, {}, torch.zeros(4)))
    assert state["votes"].sum().item() == 16 * 32
    labels = cluster("hpse", space, Stats({"hpse": {"u": state}}))["u"]
    assert adjusted_rand_score(truth, labels) >= 0.9
    assert labels.min() >= 0 and labels.max() <= 3
    # relabelled by ascending shape energy: label = energy rank = planted level
    assert (labels == truth).mean() >= 0.9
    with pytest.raises(ValueError, match="fixed at calibration"):
        cluster("hpse", space, Stats({"hpse": {"u": state}}), 3)


# ----------------------------------------------------------------------------- FCHP

def test_svd_content_matches_numpy():
    torch.manual_seed(0)
    maps = torch.randn(3, 5, 6, 9)
    for k in (1, 2, 3):
        ref = np.linalg.svd(maps.double().numpy(), compute_uv=False)[..., :k].sum(-1)
        np.testing.assert_allclose(svd_content(maps, k).numpy(), ref, rtol=1e-5)
    for shape in [(2, 3, 6, 9), (2, 3, 9, 6)]:  # wide and tall maps
        maps = torch.randn(*shape)
        u, s, vh = np.linalg.svd(maps.double().numpy(), full_matrices=False)
        ref = (u[..., :2] * s[..., None, :2]) @ vh[..., :2, :]
        recon, content = discriminative(maps, 2)
        np.testing.assert_allclose(recon.numpy(), ref, atol=1e-4)
        np.testing.assert_allclose(content.numpy(), s[..., :2].sum(-1), rtol=1e-5)


def test_fchp_score_is_mean_content():
    torch.manual_seed(0)
    u = unit("u", 5)
    crit = FCHP(k=2)
    state = crit.init(u, SimpleNamespace(units=[u]))
    maps = torch.randn(6, 5, 7, 7)
    for i in (0, 3):
        crit.update(u, state, Batch({("pre", "u"): maps[i:i + 3]}, {}, torch.zeros(3)))
    stats = Stats({"fchp": {"u": state}})
    ref = np.linalg.svd(maps.double().numpy(), compute_uv=False)[..., :2].sum(-1).mean(0)
    np.testing.assert_allclose(crit.score(SimpleNamespace(units=[u]), stats)["u"].numpy(), ref, rtol=1e-5)
    assert state["corr"].shape == (5, 0)
    assert (cluster("fchp", SimpleNamespace(units=[u]), stats, 2)["u"] == 0).all()  # no next unit


def test_pearson_known_answers():
    a = torch.tensor([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    b = torch.tensor([[[2.0, 4.0, 6.0], [3.0, 2.0, 1.0]]])
    np.testing.assert_allclose(pearson(a, b)[0].numpy(), [[1, -1], [0, 0]], atol=1e-12)


def test_fchp_recovers_planted_correlation_groups():
    g = torch.Generator().manual_seed(2)
    groups, per, hw = 3, 8, 8
    c = groups * per
    truth = (torch.arange(c) // per)[torch.randperm(c, generator=g)]
    ua = unit("a", c, consumers=(("b", tuple(range(c)), tuple(range(c))),))
    ub = unit("b", 2 * groups)
    space = SimpleNamespace(units=[ua, ub])
    assert next_unit(space, ua) is ub and next_unit(space, ub) is None
    crit = FCHP()
    states = {u.name: crit.init(u, space) for u in space.units}
    for _ in range(4):
        n = 4
        pats = torch.randn(n, groups, hw, 1, generator=g) * torch.randn(n, groups, 1, hw, generator=g)
        amp = (0.5 + 1.5 * torch.rand(n, c, 1, 1, generator=g))
        a = amp * pats[:, truth] + 0.1 * torch.randn(n, c, hw, hw, generator=g)
        nxt = pats.repeat_interleave(2, dim=1)  # channels 2g, 2g+1 follow group g
        nxt = nxt.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 16×16: pooled back to 8×8
        nxt = nxt + 0.1 * torch.randn(n, 2 * groups, 2 * hw, 2 * hw, generator=g)
        batch = Batch({("pre", "a"): a, ("pre", "b"): nxt}, {}, torch.zeros(n))
        for u in space.units:
            crit.update(u, states[u.name], batch)
    stats = Stats({"fchp": states})
    assert states["a"]["corr"].shape == (c, 2 * groups) and float(states["a"]["n"]) == 16
    labels = cluster("fchp", space, stats, {"a": 3})
    assert adjusted_rand_score(truth.numpy(), labels["a"]) >= 0.9
    assert (labels["b"] == 0).all()
    assert sorted(np.unique(labels["a"])) == [0, 1, 2]
    # default k = width // 16 = 1 for a
    assert (cluster("fchp", space, stats)["a"] == 0).all()


def test_fchp_calibrate_end_to_end():
    torch.manual_seed(0)
    model = Tiny().eval()
    space = ap.Space(model, torch.randn(1, 2, 8, 8))
    batches = [(torch.randn(8, 2, 8, 8), torch.zeros(8, dtype=torch.long)) for _ in range(2)]
    stats = ap.calibrate(space, model, batches, criteria=[("fchp", {"k": 1}), "hpse"], n_images=16,
                         progress=False)
    assert stats["fchp"]["conv1"]["corr"].shape == (4, 4)  # next unit: conv2
    assert stats["fchp"]["conv2"]["corr"].shape == (4, 0)  # fc is the classifier, not a unit
    scores = ap.criteria.score("fchp", space, stats, k=1)
    assert set(scores) == {"conv1", "conv2"} and all(s.shape == (4,) for s in scores.values())
    labels = cluster("fchp", space, stats, 2)
    assert len(np.unique(labels["conv1"])) == 2 and (labels["conv2"] == 0).all()
    assert set(cluster("hpse", space, stats)) == {"conv1", "conv2"}


# ----------------------------------------------------------------------------- SG-CNN and selection

def sg_model(seed=3):
    """conv1: 16 filters over 8 inputs in 4 planted groups; group g reads inputs 2g, 2g+1.
    Group 0's filters are the largest, so plain L1 selection would keep only them."""
    g = torch.Generator().manual_seed(seed)
    model = Tiny(c_in=8, width=16, k1=3).eval()
    truth = (torch.arange(16) // 4)[torch.randperm(16, generator=g)]
    w = 0.05 * torch.rand(16, 8, 3, 3, generator=g)
    for i, grp in enumerate(truth.tolist()):
        w[i, 2 * grp: 2 * grp + 2] = (2.0 if grp == 0 else 1.0) * (0.8 + 0.4 * torch.rand(2, 3, 3, generator=g))
    signs = torch.randint(0, 2, w.shape, generator=g) * 2 - 1
    with torch.no_grad():
        model.conv1.weight.copy_(w * signs)
    return model, truth.numpy()


@pytest.fixture(scope="module")
def sg_space():
    model, truth = sg_model()
    return ap.Space(model, torch.randn(1, 8, 8, 8)), truth


def test_sg_recovers_planted_filter_groups(sg_space):
    space, truth = sg_space
    v = importance_vectors(space, space.unit("conv1"))
    assert v.shape == (16, 8)
    w = space.model.conv1.weight.detach().double()
    assert torch.allclose(v, w.abs().sum((2, 3)))
    labels = cluster("sg", space, None, 4)
    assert adjusted_rand_score(truth, labels["conv1"]) >= 0.9
    assert sorted(np.unique(labels["conv1"])) == [0, 1, 2, 3]
    assert len(np.unique(cluster("sg", space, None, {"conv1": 2})["conv1"])) == 2
    assert len(np.unique(cluster("sg", space)["conv1"])) == 16  # default 16, capped at width
    assert len(np.unique(cluster("sg", space)["conv2"])) == 4


def test_select_keeps_a_channel_per_sg_cluster(sg_space):
    space, truth = sg_space
    clusters = cluster("sg", space, None, 4)
    widths = {"conv1": 4}
    plain = ap.select(space, widths).keep["conv1"]
    assert set(truth[plain]) == {0}  # L1 alone keeps only the big group
    keep = ap.select(space, widths, clusters=clusters).keep["conv1"]
    assert len(keep) == 4
    assert set(clusters["conv1"][keep]) == {0, 1, 2, 3}
    for kept in (4, 6, 9):
        keep = ap.select(space, {"conv1": kept}, clusters=clusters).keep["conv1"]
        assert len(keep) == kept and set(clusters["conv1"][keep]) == {0, 1, 2, 3}


def test_cluster_errors():
    space = SimpleNamespace(units=[unit("u", 4)])
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster("nope", space, None, 2)
    with pytest.raises(ValueError, match="calibrat"):
        cluster("hpse", space, None)
    with pytest.raises(KeyError, match="hpse"):
        cluster("hpse", space, Stats({"fchp": {}}))


# ----------------------------------------------------------------------------- k-means

def blobs(seed=0, k=5, per=20, d=6):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(k, d, generator=g)
    truth = torch.arange(k).repeat_interleave(per)
    return centres[truth] + torch.randn(k * per, d, generator=g), truth.numpy()


def test_kmeans_recovers_blobs_and_is_deterministic():
    x, truth = blobs()
    for restarts in (1, 4):
        a, ca = kmeans(x, 5, seed=7, restarts=restarts)
        b, cb = kmeans(x, 5, seed=7, restarts=restarts)
        assert torch.equal(a, b) and torch.equal(ca, cb)
        assert a.dtype == torch.long and ca.shape == (5, 6)
    labels, centres = kmeans(x, 5, seed=0, restarts=3)
    assert adjusted_rand_score(truth, labels.numpy()) == 1.0
    assert labels[0] == 0  # numbered by first appearance
    for j in range(5):
        assert torch.allclose(centres[j], x[labels == j].double().mean(0))


def test_kmeans_edge_cases():
    x = torch.ones(6, 3)  # identical points: still k non-empty clusters
    labels, centres = kmeans(x, 3)
    assert sorted(labels.unique().tolist()) == [0, 1, 2] and centres.shape == (3, 3)
    labels, _ = kmeans(torch.randn(3, 2), 10)  # k capped at n
    assert sorted(labels.tolist()) == [0, 1, 2]
    labels, centres = kmeans(torch.randn(4, 2), 1)
    assert (labels == 0).all() and centres.shape == (1, 2)
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        kmeans(torch.randn(4), 2)
    xb = torch.randn(3, 10, 4)
    la, _ = kmeans_batched(xb, 3, seed=1)
    lb, _ = kmeans_batched(xb, 3, seed=1)
    assert torch.equal(la, lb) and la.shape == (3, 10)
    assert all(len(row.unique()) == 3 for row in la)


def test_registry_lists_criteria():
    assert {"hpse", "fchp"} <= set(ap.criteria.available())
    assert ap.criteria.get("hpse").tap == "pre" and ap.criteria.get("fchp").tap == "pre"
