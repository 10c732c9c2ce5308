"""Coupled units are scored from every layer that writes or reads their channels.

A residual stream is written by several convs (the stem, each block's second conv) and read
by several layers (each block, then the classifier). Calibration taps every member, each
criterion keeps one fixed-size summary per member and reduces over them
(:func:`autoprune.criteria.base.reduce_members`). The known answers below come from a
constructed net where only the last writer of the stream carries the class signal.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune as ap
from autoprune import criteria
from autoprune.calibrate import calibrate
from autoprune.criteria.base import members, reduce_members
from autoprune.criteria.di import delta_di, fullmap_channel_grads
from autoprune.criteria.hpse import edge_scores
from autoprune.criteria.hrank import map_ranks
from autoprune.criteria.wsp import data_saliency

C = 6
SIGNAL = (2, 4)
"""Stream channels the last writer ``d`` fills with the class signal."""


class ResidualNet(nn.Module):
    """stem → block1 (a → b, identity add) → block2 (c → d, identity add) → GAP → FC."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=False)
        self.a = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.b = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.c = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.d = nn.Conv2d(C, C, 3, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(C, 3)

    def forward(self, x):
        s = F.relu(self.stem(x))
        s = F.relu(s + self.b(F.relu(self.a(s))))
        s = F.relu(s + self.d(F.relu(self.c(s))))
        return self.fc(self.flatten(self.pool(s)))


def residual_net() -> nn.Module:
    """Input channel 0 holds the class as stripes: horizontal (class 0), vertical (1), none (2).
    The stem copies them onto stream channel 0, where their global average is 0 whatever the
    class, and writes noise (input channels 1-2) on channels 1-5; ``b`` writes noise. ``c``
    turns the stripes into a class-dependent mean (a vertical and a horizontal difference,
    rectified) and ``d`` writes those onto stream channels SIGNAL: only ``d``, the stream's
    last writer, carries the class in its pooled output."""
    torch.manual_seed(0)
    net = ResidualNet()
    with torch.no_grad():
        for conv in (net.stem, net.a, net.b, net.c, net.d):
            conv.weight.zero_()
        net.stem.weight[0, 0, 1, 1] = 1.0
        net.stem.weight[1:, 1:3].normal_(0, 0.3)
        net.a.weight[:, 1:].normal_(0, 0.2)
        net.b.weight[1:].normal_(0, 0.2)
        net.c.weight[0, 0, 1, 1], net.c.weight[0, 0, 0, 1] = 1.0, -1.0   # responds to class 0
        net.c.weight[1, 0, 1, 1], net.c.weight[1, 0, 1, 0] = 1.0, -1.0   # responds to class 1
        net.c.weight[2:, 1:].normal_(0, 0.2)
        net.d.weight[SIGNAL[0], 0, 1, 1] = 1.0
        net.d.weight[SIGNAL[1], 1, 1, 1] = 1.0
        others = [k for k in range(C) if k not in SIGNAL]
        net.d.weight[others, 2:] = 0.2 * torch.randn(len(others), C - 2, 3, 3)
    return net.eval()


def stripe_batches(n_batches=4, size=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = (torch.arange(8) % 2 * 2 - 1).float()
    out = []
    for _ in range(n_batches):
        y = torch.arange(size) % 3
        x = torch.randn(size, 3, 8, 8, generator=g)
        x[:, 0] *= 0.1
        x[y == 0, 0] += rows.view(8, 1)
        x[y == 1, 0] += rows.view(1, 8)
        out.append((x, y))
    return out


@pytest.fixture(scope="module")
def residual():
    net = residual_net()
    space = ap.Space(net, torch.randn(1, 3, 8, 8))
    stream = space.unit("stem")
    assert stream.modules == ("stem", "b", "d")
    assert members(stream, "post") == ("a", "c", "fc")
    return net, space, stream


def _hooked(net, names, batches, inputs=False):
    """Every batch's outputs (or inputs) of the layers ``names``, recorded by plain hooks."""
    seen = {n: [] for n in names}
    hooks = []
    for n in names:
        mod = net.get_submodule(n)
        if inputs:
            hooks.append(mod.register_forward_pre_hook(lambda m, i, n=n: seen[n].append(i[0].detach())))
        else:
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=n: seen[n].append(o.detach())))
    with torch.no_grad():
        for x, _ in batches:
            net(x)
    for h in hooks:
        h.remove()
    return seen


def test_di_ranks_the_stream_by_its_signal_writer(residual):
    """Known answer: the stream's class signal is written by ``d`` alone; the stem (the unit's
    first root, all that was tapped before) writes noise there. DI must put SIGNAL on top, and
    equal the mean over writers of each writer's exact ΔDI, recomputed from hooked maps."""
    net, space, stream = residual
    batches = stripe_batches(seed=1)
    stats = calibrate(space, net, batches, criteria=["di"], n_images=120, progress=False)
    score = criteria.score("di", space, stats)[stream.name]
    assert set(torch.topk(score, len(SIGNAL)).indices.tolist()) == set(SIGNAL)
    labels = torch.cat([y for _, y in batches])
    maps = _hooked(net, stream.modules, batches)
    per_writer = [delta_di(torch.cat(maps[w]).double(), labels) for w in stream.modules]
    torch.testing.assert_close(score, torch.stack(per_writer).mean(0), rtol=1e-8, atol=1e-12)
    stem_only = per_writer[0]  # the old score: the stem's noise ranks SIGNAL nowhere near the top
    assert set(torch.topk(stem_only, len(SIGNAL)).indices.tolist()) != set(SIGNAL)


def test_every_member_is_reduced(residual):
    """Each activation criterion equals its documented reduction over every member, recomputed
    from plain hooks: di_fullmap the joint mask gradient over all writers' maps, hpse the
    rescaled mean of the writers' edge energies, hrank/taylor the mean over the readers."""
    net, space, stream = residual
    batches = stripe_batches(n_batches=2)
    stats = calibrate(space, net, batches, criteria=["di_fullmap", "hpse", "hrank", "taylor"],
                      n_images=60, progress=False)
    out = {n: criteria.score(n, space, stats)[stream.name] for n in ("di_fullmap", "hpse", "hrank", "taylor")}
    writers = _hooked(net, stream.modules, batches)
    joint = sum(fullmap_channel_grads(torch.cat([writers[w][i].reshape(30, C, -1) for w in stream.modules], 2),
                                      batches[i][1]) for i in range(2))
    torch.testing.assert_close(out["di_fullmap"], joint)
    edges = torch.stack([torch.cat([edge_scores(m) for m in writers[w]]).mean(0).double() for w in stream.modules])
    means = edges.mean(1, keepdim=True)
    torch.testing.assert_close(out["hpse"], (edges * means.mean() / means).mean(0).float(), rtol=1e-5, atol=0)
    readers = _hooked(net, ("a", "c", "fc"), batches, inputs=True)
    ranks = torch.stack([torch.cat([map_ranks(m) for m in readers[r]]).mean(0) for r in ("a", "c", "fc")])
    torch.testing.assert_close(out["hrank"], ranks.mean(0))
    # Taylor: |Σ_hw a·∂ℓ_i/∂a| per image at every reader's input, mean over images, then readers
    thetas = {r: [] for r in ("a", "c", "fc")}
    for x, y in batches:
        acts = {}
        hooks = [net.get_submodule(r).register_forward_pre_hook(lambda m, i, r=r: acts.setdefault(r, i[0]))
                 for r in thetas]
        loss = F.cross_entropy(net(x), y, reduction="sum")
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss, [acts[r] for r in thetas])
        for r, g in zip(thetas, grads):
            thetas[r].append((acts[r] * g).reshape(len(x), C, -1).sum(2).abs().detach())
    expected = torch.stack([torch.cat(v).mean(0) for v in thetas.values()]).mean(0)
    torch.testing.assert_close(out["taylor"], expected.float(), rtol=1e-4, atol=1e-7)


def test_one_member_scores_as_before():
    """A unit with one writer and one reader (a block's first conv): every activation criterion
    gives what the single-tap formula gives, recomputed from plain hooks; the reduction of one
    member returns it bit for bit."""
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=3).eval()
    space = ap.Space(model, torch.randn(1, 3, 8, 8))
    unit = space.unit("layer1.0.conv1")
    assert members(unit, "pre") == ("layer1.0.conv1",) and members(unit, "post") == ("layer1.0.conv2",)
    batches = stripe_batches(n_batches=2)
    stats = calibrate(space, model, batches, criteria=["di", "hpse", "hrank", "wsp_data"], n_images=60,
                      progress=False)
    pre = torch.cat(_hooked(model, [unit.name], batches)[unit.name])
    post = torch.cat(_hooked(model, ["layer1.0.conv2"], batches, inputs=True)["layer1.0.conv2"])
    labels = torch.cat([y for _, y in batches])
    torch.testing.assert_close(criteria.score("di", space, stats)[unit.name],
                               delta_di(pre.double(), labels), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(criteria.score("hpse", space, stats)[unit.name], edge_scores(pre).mean(0))
    torch.testing.assert_close(criteria.score("hrank", space, stats)[unit.name], map_ranks(post).mean(0))
    f = post.abs().flatten(2).mean(2).mean(0)  # WSP's data f: mean |a| over images and positions
    torch.testing.assert_close(data_saliency(stats)[unit.name][0], f.double(), rtol=1e-6, atol=1e-9)
    x = torch.rand(1, 7, dtype=torch.double)
    assert torch.equal(reduce_members(x, same_scale=False), x[0])
    assert torch.equal(reduce_members(x, same_scale=True), x[0])


def test_reduction_is_per_member_scale_free_and_ignores_flat_members():
    """``same_scale=False``: rescaling one member changes nothing, and a member whose channels
    are all alike (noise energy spread evenly) cannot overturn the discriminating member."""
    peaked = torch.tensor([0.1, 0.2, 5.0, 0.1, 4.0, 0.3], dtype=torch.double)
    flat = 1 + 0.01 * torch.tensor([5.0, 4.0, 0.0, 3.0, 1.0, 2.0], dtype=torch.double)
    scores = torch.stack([flat, peaked, flat])
    out = reduce_members(scores, same_scale=False)
    scaled = scores * torch.tensor([[1e3], [1e-2], [7.0]], dtype=torch.double)
    torch.testing.assert_close(reduce_members(scaled, same_scale=False), out * (scaled.mean(1).mean()
                                                                               / scores.mean(1).mean()))
    assert set(torch.topk(out, 2).indices.tolist()) == {2, 4}
    # rank-normalising instead would let the two flat members outvote the peaked one here
    ranks = torch.stack([criteria.rank_normalise(s) for s in scores]).mean(0)
    assert set(torch.topk(ranks, 2).indices.tolist()) != {2, 4}


def test_summaries_stay_fixed_size(residual):
    """One fixed-size slice per member: the size depends on the members, not on the images."""
    net, space, stream = residual
    names = [("di", {"num_classes": 3}), "di_fullmap", "hpse", "fchp", "hrank", "taylor", "wsp_data"]
    small = calibrate(space, net, stripe_batches(), criteria=names, n_images=30, progress=False)
    large = calibrate(space, net, stripe_batches(), criteria=names, n_images=120, progress=False)
    assert small.settings["n_images"] == 30 and large.settings["n_images"] == 120
    assert small.nbytes() == large.nbytes() > 0
    state = large["di"][stream.name]
    assert state["second"].shape == (3, C, C) and state["class_sums"].shape == (3, 3, C)
    assert large["hpse"][stream.name]["edge"].shape == (3, C)
    assert large["hrank"][stream.name]["count"].tolist() == [120.0] * 3  # every reader saw every image


def test_resnet20_every_unit_and_criterion():
    """Every criterion scores every unit of ResNet-20 with one finite score per channel; the
    stream units' readers that read the very same tensor (block conv and projection shortcut)
    are counted once, and HRank of a stream is the mean over the distinct readers."""
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=3).eval()
    space = ap.Space(model, torch.randn(1, 3, 8, 8))
    batches = stripe_batches(n_batches=1, size=12)
    tapped = [n for n in criteria.available() if criteria.get(n).taps() and n != "fpar"]
    stats = calibrate(space, model, batches, criteria=tapped, n_images=12, progress=False)
    ones = {u.name: torch.ones(u.width) for u in space.units}
    for name in criteria.available():
        params = {"attention": ones} if name == "fpar" else {}
        scores = criteria.score(name, space, stats, **params)
        assert set(scores) == set(space.unit_names), name
        for unit in space.units:
            assert scores[unit.name].shape == (unit.width,), (name, unit.name)
            assert torch.isfinite(scores[unit.name]).all(), (name, unit.name)
    stream = space.unit("conv1")
    readers = members(stream, "post")
    assert readers[-2:] == ("layer2.0.conv1", "layer2.0.shortcut.0")
    counts = stats["hrank"][stream.name]["count"]
    assert counts.tolist() == [12.0] * (len(readers) - 1) + [0.0]
    seen = _hooked(model, readers[:-1], batches, inputs=True)
    expected = torch.stack([map_ranks(seen[r][0]).mean(0) for r in readers[:-1]]).mean(0)
    torch.testing.assert_close(criteria.score("hrank", space, stats)[stream.name], expected)
