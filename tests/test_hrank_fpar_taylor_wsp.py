"""HRank, FPAR, Taylor and WSP against known answers and independent computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import SqueezeExcitation

import autoprune as ap
from autoprune import criteria
from autoprune.calibrate import calibrate
from autoprune.criteria.base import Batch, Stats
from autoprune.criteria.fpar import attention, combine, fpar_scores, native_gates
from autoprune.criteria.hrank import map_ranks
from autoprune.criteria.wsp import saliency
from autoprune.wsp import weak_sets, wsp_percentile, wsp_plan, wsp_widths


class Tiny(nn.Module):
    """conv-BN-ReLU, conv-BN-ReLU, GAP, linear; optionally an SE block after the first ReLU."""

    def __init__(self, se: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.se = SqueezeExcitation(8, 4) if se else nn.Identity()
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12, 10)
        for bn in (self.bn1, self.bn2):  # non-trivial eval-mode statistics
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = self.se(self.relu1(self.bn1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(self.relu2(self.bn2(self.conv2(x))))))


def _batches(n_batches=3, size=4, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, hw, hw, generator=g), torch.randint(0, 10, (size,), generator=g))
            for _ in range(n_batches)]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Tiny().eval()
    return model, ap.Space(model, torch.randn(1, 3, 8, 8))


@pytest.fixture(scope="module")
def vgg():
    torch.manual_seed(0)
    model = ap.models.create("vgg16_bn").eval()
    return model, ap.Space(model, torch.randn(1, 3, 16, 16))


def test_registered():
    assert {"hrank", "fpar", "taylor", "wsp", "wsp_data"} <= set(criteria.available())


# --- HRank -------------------------------------------------------------------------------

def _rank_r_maps(ranks, n=5, h=8, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.zeros(n, len(ranks), h, w, dtype=torch.double)
    for c, r in enumerate(ranks):
        for _ in range(r):  # sum of r random outer products: rank exactly r (almost surely)
            maps[:, c] += torch.einsum("nh,nw->nhw", torch.randn(n, h, generator=g, dtype=torch.double),
                                       torch.randn(n, w, generator=g, dtype=torch.double))
    return maps.float()


def test_hrank_scores_constructed_rank(tiny):
    model, space = tiny
    unit = space.unit("conv1")
    ranks = [0, 1, 2, 3, 4, 5, 6, 2]
    crit = criteria.get("hrank")
    state = crit.init(unit, space)
    for seed in range(3):  # several batches: the mean over images is still r
        crit.update(unit, state, Batch({("post", "conv1"): _rank_r_maps(ranks, seed=seed)}, {}, torch.zeros(5)))
    score = crit.score(space, Stats({"hrank": {"conv1": state}}))["conv1"]
    assert score.tolist() == [float(r) for r in ranks]


def test_map_ranks_shapes():
    assert map_ranks(torch.tensor([[0.0, 2.0, -1.0]])).tolist() == [[0.0, 1.0, 1.0]]  # linear: 1×1 maps
    flat = _rank_r_maps([1, 3], h=4, w=4).reshape(5, 2, 16)  # flatten into a linear layer: s×s
    assert map_ranks(flat)[0].tolist() == [1.0, 3.0]


def test_hrank_calibrated_in_range(tiny):
    model, space = tiny
    stats = calibrate(space, model, _batches(), criteria=["hrank"], n_images=8, progress=False)
    scores = criteria.score("hrank", space, stats)
    assert stats.settings["n_images"] == 8
    assert scores["conv1"].shape == (8,) and 0 <= scores["conv1"].min() and scores["conv1"].max() <= 8
    eighths = scores["conv2"] * 8  # read at the linear layer: 1×1 maps of rank 0 or 1, 8 images
    assert torch.equal(eighths, eighths.round()) and 0 <= scores["conv2"].min() and scores["conv2"].max() <= 1


# --- Taylor and data-driven WSP vs independent autograd ---------------------------------

def _per_image_reference(model, x, y):
    """Per image, (activation, gradient of that image's loss) at relu1 and at the flatten."""
    found = {}
    hooks = [model.relu1.register_forward_hook(lambda m, i, o: found.__setitem__("conv1", o)),
             model.flatten.register_forward_hook(lambda m, i, o: found.__setitem__("conv2", o))]
    out = []
    try:
        for i in range(len(x)):
            loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
            grads = torch.autograd.grad(loss, [found["conv1"], found["conv2"]])
            out.append({k: (found[k].detach()[0], g[0]) for k, g in zip(("conv1", "conv2"), grads)})
    finally:
        for h in hooks:
            h.remove()
    return out


def test_taylor_and_wsp_data_match_autograd(tiny):
    model, space = tiny
    batches = _batches(n_batches=3, size=3)
    stats = calibrate(space, model, batches, criteria=["taylor", "wsp_data"], n_images=8, progress=False)
    x = torch.cat([b[0] for b in batches])[:8]
    y = torch.cat([b[1] for b in batches])[:8]
    ref = _per_image_reference(model, x, y)
    taylor = criteria.score("taylor", space, stats)
    f_b = saliency(space, stats, "data")
    for unit in ("conv1", "conv2"):
        width = space.unit(unit).width
        expect_t = torch.stack([(a * g).reshape(width, -1).sum(1).abs() for a, g in (r[unit] for r in ref)]).mean(0)
        expect_f = torch.stack([a.abs().reshape(width, -1).mean(1) for a, _ in (r[unit] for r in ref)]).mean(0)
        expect_b = torch.stack([g.abs().reshape(width, -1).mean(1) for _, g in (r[unit] for r in ref)]).mean(0)
        torch.testing.assert_close(taylor[unit], expect_t, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f_b[unit][0].float(), expect_f, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(f_b[unit][1].float(), expect_b, rtol=1e-4, atol=1e-7)
    assert taylor["conv1"].max() > 0
    data_scores = criteria.score("wsp_data", space, stats)
    via_variant = criteria.score("wsp", space, stats, variant="data")
    assert all(torch.equal(data_scores[u], via_variant[u]) for u in data_scores)
    widths = wsp_widths(space, stats, 50, variant="data")
    assert all(1 <= widths[u.name] <= u.width for u in space.units)


# --- FPAR ---------------------------------------------------------------------------------

GATES = torch.tensor([0.3, 0.9, 0.1, 0.6, 0.75, 0.2, 0.45, 0.55])


@pytest.fixture(scope="module")
def se_model():
    torch.manual_seed(1)
    model = Tiny(se=True).eval()
    with torch.no_grad():  # fixed gates: zero excitation weights, bias = logit(gate)
        model.se.fc2.weight.zero_()
        model.se.fc2.bias.copy_(torch.logit(GATES))
    return model, ap.Space(model, torch.randn(1, 3, 8, 8))


def test_fpar_native_gates_follow_the_se(se_model):
    model, space = se_model
    assert native_gates(space) == {"conv1": ["se.scale_activation"]}
    att = attention(space, model, _batches(), steps=2)
    assert set(att) == set(space.unit_names)
    torch.testing.assert_close(att["conv1"], GATES)
    stats = calibrate(space, model, _batches(), criteria=["hrank"], n_images=12, progress=False)
    gate_only = criteria.score("fpar", space, stats, attention=att, lam=0)
    assert torch.equal(torch.argsort(gate_only["conv1"]), torch.argsort(GATES))
    both = criteria.score("fpar", space, stats, attention=att)  # reads hrank's summaries
    rank = criteria.score("hrank", space, stats)["conv1"]
    torch.testing.assert_close(both["conv1"], GATES / GATES.max() + rank / rank.max())
    one_call = fpar_scores(space, model, _batches(), lam=0, steps=2)
    assert torch.equal(torch.argsort(one_call["conv1"]), torch.argsort(GATES))


def test_fpar_combine_and_missing_attention(se_model):
    model, space = se_model
    out = combine({"u": torch.tensor([0.5, 1.0])}, {"u": torch.tensor([4.0, 0.0])}, lam=2)
    torch.testing.assert_close(out["u"], torch.tensor([2.5, 1.0]))
    out = combine({"u": torch.tensor([0.5, 1.0, 0.75])}, {"u": torch.tensor([4.0, 2.0, 3.0])}, norm="minmax")
    torch.testing.assert_close(out["u"], torch.tensor([1.0, 1.0, 1.0]))
    stats = calibrate(space, model, _batches(), criteria=["fpar"], n_images=4, progress=False)
    with pytest.raises(ValueError, match="attention"):
        criteria.score("fpar", space, stats)


def _hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_fpar_probes_deterministic_and_restore_model(tiny):
    model, space = tiny
    batches = _batches(n_batches=4, size=4)
    x = batches[0][0]
    before = model(x).detach()
    model.train()
    results = {}
    for steps in (0, 3, 6):
        a = attention(space, model, batches, steps=steps, read_batches=2, seed=0)
        b = attention(space, model, batches, steps=steps, read_batches=2, seed=0)
        assert all(torch.equal(a[u], b[u]) for u in a)  # same seed, same result
        for u in space.units:
            assert a[u.name].shape == (u.width,)
            assert ((a[u.name] > 0) & (a[u.name] < 1)).all()
        results[steps] = a
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in results[0].values())  # untrained: 0.5
    assert not torch.equal(results[6]["conv1"], results[0]["conv1"])  # training separates channels
    other = attention(space, model, batches, steps=3, read_batches=2, seed=1)
    assert not torch.equal(other["conv1"], results[3]["conv1"])
    assert model.training and all(p.requires_grad for p in model.parameters()) and _hooks(model) == 0
    model.eval()
    torch.testing.assert_close(model(x), before)


def test_fpar_native_only_mode(se_model):
    model, space = se_model
    att = attention(space, model, _batches(), mode="native")
    torch.testing.assert_close(att["conv1"], GATES)
    assert torch.equal(att["conv2"], torch.ones(12))
    with pytest.raises(ValueError, match="mode"):
        attention(space, model, _batches(), mode="bogus")


def test_fpar_finds_torchvision_se_blocks():
    model = ap.models.create("mobilenet_v3_small").eval()
    space = ap.Space(model, torch.randn(1, 3, 32, 32))
    gates = native_gates(space)
    se_blocks = [n for n, m in model.named_modules() if isinstance(m, SqueezeExcitation)]
    assert sorted(g for names in gates.values() for g in names) == sorted(f"{n}.scale_activation" for n in se_blocks)
    for unit, (gate,) in gates.items():
        assert gate.replace("scale_activation", "fc2") in space.unit(unit).modules


# --- WSP ----------------------------------------------------------------------------------

def _vgg_saliency_numpy(model):
    """f and b of each VGG unit, from the weights with numpy, layer by layer."""
    layers = [(n, m.weight.detach().double().numpy()) for n, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = {}
    for (name, w), (_, nxt) in zip(layers, layers[1:]):
        f = np.abs(w).reshape(w.shape[0], -1).sum(1)
        b = np.abs(nxt).sum(axis=tuple(i for i in range(nxt.ndim) if i != 1))
        out[name] = (f, b)
    return out


@pytest.mark.parametrize("p", [30, 80])
def test_wsp_weak_set_is_percentile_intersection(vgg, p):
    model, space = vgg
    reference = _vgg_saliency_numpy(model)
    assert set(reference) == set(space.unit_names) and "classifier.0" in reference
    weak = weak_sets(space, None, p)
    widths = wsp_widths(space, None, p)
    for unit, (f, b) in reference.items():
        expect = np.flatnonzero((f < np.percentile(f, p)) & (b < np.percentile(b, p)))
        assert np.array_equal(weak[unit], expect), unit
        assert widths[unit] == space.unit(unit).width - len(expect)
    assert len(weak["classifier.0"]) > 0  # the FC unit takes part
    plan = wsp_plan(space, None, p)
    for unit, keep in plan.keep.items():
        assert keep == sorted(set(range(space.unit(unit).width)) - set(weak[unit].tolist()))
    assert plan.meta["p"] == p


def test_wsp_scores_are_min_rank(vgg):
    model, space = vgg
    scores = criteria.score("wsp", space)
    f, b = saliency(space)["features.0"]
    expect = torch.minimum(criteria.rank_normalise(f), criteria.rank_normalise(b)).float()
    assert torch.equal(scores["features.0"], expect)
    assert 0 <= float(scores["classifier.0"].min()) and float(scores["classifier.0"].max()) <= 1


def test_wsp_budget(vgg):
    model, space = vgg
    budget = ap.Budget.parse("flops<=50%")
    widths = wsp_widths(space, None, budget="flops<=50%")
    realized, target = space.cost(widths).flops, budget.target(space)
    assert realized <= target and realized > 0.8 * target
    p = wsp_percentile(space, None, budget)
    assert 0 < p < 100 and widths == wsp_widths(space, None, p)
    plan = wsp_plan(space, None, budget=budget)
    assert plan.kept_widths() == {u: k for u, k in widths.items() if k < space.unit(u).width}
    small = plan.apply(model)
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(ValueError, match="not both"):
        wsp_widths(space, None, 50, budget=budget)


def test_wsp_budget_unreachable(vgg):
    model, space = vgg
    floor = space.cost(wsp_widths(space, None, 100)).flops
    with pytest.raises(ap.BudgetError, match="p=100"):
        wsp_widths(space, None, budget=ap.Budget("flops", floor - 1, relative=False))


# --- WSP through autoprune.prune: the method removes exactly the weak sub-network ---------

def _no_finish(model, small, data, space, budget, widths, *args, **kwargs):
    """pipeline.finish without adaptive BN, fine-tuning and timing: the test reads the Plan."""
    return {"widths": {u.name: [widths[u.name], u.width] for u in space.units},
            "finetune": {"epochs": 0, "wall_s": 0.0}}


@pytest.mark.parametrize("variant", ["weight", "data"])
@pytest.mark.parametrize("arch, size", [("resnet20", 16), ("vgg16_bn", 32)])
def test_prune_wsp_removes_exactly_the_weak_subnetwork(monkeypatch, arch, size, variant):
    """prune(method="wsp") at flops<=50% removes every weak channel and no other (random
    weights, so the weak set is large), i.e. it equals wsp_plan exactly; the data variant's
    saliencies come from the same calibration pass, recomputed here."""
    from autoprune import pipeline
    from autoprune.data import loader
    from autoprune.prune import prune
    monkeypatch.setattr(pipeline, "finish", _no_finish)
    torch.manual_seed(0)
    model = ap.models.create(arch, num_classes=4).eval()
    data = ap.data.load("synthetic", image_size=size)
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    stats = None
    if variant == "data":  # prune's calibration: the training split, batches of 64, seed 0
        stats = calibrate(space, model, loader(data.train, batch_size=64, shuffle=True, seed=0),
                          ["wsp_data"], n_images=32, device="cpu", progress=False)
    result = prune(model, data, "flops<=50%", method="wsp", wsp_variant=variant, calib_images=32,
                   progress=False, device="cpu")
    expected = wsp_plan(space, stats, budget="flops<=50%", variant=variant)
    assert result.plan.keep == expected.keep and result.plan.widths == expected.widths
    assert result.report["wsp"] == {"variant": variant, "p": expected.meta["p"]}
    assert result.report["criterion"] == {"wsp" if variant == "weight" else "wsp_data": 1.0}
    assert result.plan.meta["p"] == expected.meta["p"] and result.plan.meta["variant"] == variant
    # independently: the weak sets at that percentile are gone, every other channel stays
    weak = weak_sets(space, stats, expected.meta["p"], variant)
    n_weak = sum(len(w) for w in weak.values())
    assert n_weak > 50
    for unit in space.units:
        keep = set(result.plan.keep.get(unit.name, range(unit.width)))
        assert unit.step == 1 and not keep & set(weak[unit.name].tolist()), unit.name
        assert keep == set(range(unit.width)) - set(weak[unit.name].tolist()), unit.name
    target = ap.Budget.parse("flops<=50%").target(space)
    assert space.cost(space.complete(result.plan.kept_widths())).flops <= target


def test_wsp_variant_is_checked_before_any_work():
    from autoprune.errors import AutopruneError
    from autoprune.prune import prune
    with pytest.raises(AutopruneError, match="unknown wsp_variant 'grad'; choose one of weight, data") as info:
        prune(None, None, "flops<=50%", method="wsp", wsp_variant="grad")
    assert "\n" not in str(info.value)
