"""SG-CNN diverse group convolution: known answers, exactness against a masked dense conv,
FLOPs against Σ_g |S_g|·|G_g|·k²·H·W and fvcore, save/rebuild, and composition with
channel pruning."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import autoprune as ap
from autoprune.selfgroup import (
    DiverseGroupConv, DiverseGroupLinear, apply_self_grouping, connection_threshold, eligible_convs, group_inputs,
    grouped_flops, grouped_params, self_group, self_group_entry, self_group_model,
    selfgroup_cost_delta,
)


def masked_dense(layer: nn.Module, entry: dict) -> nn.Module:
    """Independent reference: a copy of the conv or linear ``layer`` with W[i, j] = 0 for
    j ∉ S_{g(i)}."""
    ref = copy.deepcopy(layer)
    mask = torch.zeros(*ref.weight.shape[:2])
    for i, g in enumerate(entry["groups"]):
        mask[i, entry["inputs"][g]] = 1
    with torch.no_grad():
        ref.weight.mul_(mask.view(*mask.shape, *([1] * (ref.weight.dim() - 2))))
    return ref


def reference_flops(entry: dict, h: int, w: int, kh: int, kw: int) -> int:
    """Σ_g |S_g|·|G_g|·kh·kw·H·W computed by counting members directly."""
    total = 0
    for g, inputs in enumerate(entry["inputs"]):
        members = sum(1 for x in entry["groups"] if x == g)
        total += len(inputs) * members * kh * kw * h * w
    return total


pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation

# a hand-made spec with interleaved groups so that the un-permutation matters
HAND = {"groups": [2, 0, 1, 0, 2, 2, 1], "inputs": [[1, 4], [0, 1, 2, 3, 4], [3]]}


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3, stride=1, padding=1, bias=False),
    dict(kernel_size=3, stride=2, padding=1, bias=True),
    dict(kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=1, bias=True),
    dict(kernel_size=3, stride=1, padding=2, dilation=2, bias=True),
    dict(kernel_size=3, stride=1, padding=1, bias=True, padding_mode="reflect"),
])
def test_hand_spec_equals_masked_dense(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **kw)
    x = torch.randn(3, 5, 11, 10)
    grouped = DiverseGroupConv.from_conv(conv, HAND["groups"], HAND["inputs"])
    y = grouped.eval()(x)  # the per-group computation
    assert y.shape == conv(x).shape
    torch.testing.assert_close(y, masked_dense(conv, HAND)(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.to_dense()(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grouped.train()(x), y, rtol=1e-5, atol=1e-5)  # the training path
    # shapes of the real (smaller) weights: [|G_g|, |S_g|, kh, kw]
    assert [tuple(getattr(grouped, f"weight_{g}").shape[:2]) for g in range(3)] == [(2, 2), (2, 5), (3, 1)]


@pytest.mark.parametrize("kind", ["conv", "conv_reflect", "linear"])
def test_training_path_gradients_equal_per_group_path(kind):
    """Train mode runs one masked dense op; its gradients on the per-group parameters equal
    those of the per-group computation (eval mode) and of an independent masked dense layer."""
    torch.manual_seed(3)
    if kind == "linear":
        dense, x = nn.Linear(5, 7), torch.randn(4, 5)
        grouped = DiverseGroupLinear.from_linear(dense, HAND["groups"], HAND["inputs"])
    else:
        dense = nn.Conv2d(5, 7, 3, padding=1, padding_mode="reflect" if kind == "conv_reflect" else "zeros")
        x = torch.randn(2, 5, 6, 6)
        grouped = DiverseGroupConv.from_conv(dense, HAND["groups"], HAND["inputs"])
    ref = masked_dense(dense, HAND)
    ref(x).square().sum().backward()
    grads = {}
    for mode in ("train", "eval", "train_per_group"):
        grouped.zero_grad()
        grouped.train(mode != "eval")
        grouped.dense_training = mode != "train_per_group"
        if mode != "train":  # these must not take the training path
            grouped.masked_weight = lambda: pytest.fail(f"{mode}: masked dense path taken")
        grouped(x).square().sum().backward()
        grads[mode] = [getattr(grouped, f"weight_{g}").grad.clone() for g in range(3)] + \
            [getattr(grouped, f"bias_{g}").grad.clone() for g in range(3)]
    members = [[i for i, g in enumerate(HAND["groups"]) if g == k] for k in range(3)]
    expect = [ref.weight.grad[m][:, s] for m, s in zip(members, HAND["inputs"])] + \
        [ref.bias.grad[m] for m in members]
    for a, b, b2, c in zip(grads["train"], grads["eval"], grads["train_per_group"], expect):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b2, b)  # dense_training=False: the per-group computation
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    # the parameters stay the small per-group tensors: 2*2 + 2*5 + 3*1 connections
    assert sum(p.numel() for n, p in grouped.named_parameters() if n.startswith("weight_")) == \
        17 * (9 if kind != "linear" else 1)


@pytest.mark.parametrize("cp", [0.0, 0.3, 0.5, 0.8, 1.0])
def test_self_group_equals_masked_dense_and_flops(cp):
    torch.manual_seed(1)
    conv = nn.Conv2d(24, 20, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 24, 13, 13)
    grouped = self_group(conv, k=5, cp=cp, seed=3)
    entry = grouped.spec_entry()
    torch.testing.assert_close(grouped(x), masked_dense(conv, entry)(x), rtol=1e-5, atol=1e-5)
    h = w = 7
    expect = reference_flops(entry, h, w, 3, 3)
    assert grouped_flops(entry, (h, w), 3) == expect
    cost = ap.fvcore_cost(grouped, x)
    assert cost.flops == 2 * expect  # fvcore counts the batch of 2
    assert cost.params == expect // (h * w) + 20 == grouped_params(entry, 3, bias=True)
    kept = sum(len(s) * entry["groups"].count(g) for g, s in enumerate(entry["inputs"]))
    if cp == 0.0:
        assert kept == 24 * 20
    elif cp == 1.0:
        assert all(len(s) == 1 for s in entry["inputs"])
    else:
        assert kept < 24 * 20


def test_threshold_known_answer_and_numpy():
    # centroid 0 has 3 members, centroid 1 one: multiset {0,1,0,1,0,1,2,3}, median 1
    c = np.array([[0.0, 1.0], [2.0, 3.0]])
    assert connection_threshold(c, [3, 1], 0.5) == pytest.approx(1.0)
    # nothing of centroid 0 exceeds τ = 1 → its argmax is kept
    assert group_inputs(c, [3, 1], 0.5) == [[1], [0, 1]]
    rng = np.random.default_rng(0)
    cents = rng.random((6, 9))
    sizes = [1, 4, 2, 7, 3, 1]
    multiset = [v for row, n in zip(cents, sizes) for _ in range(n) for v in row]
    for cp in (0.1, 0.25, 0.5, 0.77, 0.9):
        tau = np.percentile(np.array(multiset), cp * 100)
        assert connection_threshold(cents, sizes, cp) == pytest.approx(tau)
        got = group_inputs(cents, sizes, cp)
        for row, s in zip(cents, got):
            want = [j for j, v in enumerate(row) if v > tau] or [int(np.argmax(row))]
            assert s == want
    with pytest.raises(ValueError, match="cp"):
        connection_threshold(cents, sizes, 50)


def test_kmeans_groups_planted_filters():
    """Filters built from 3 planted input patterns fall into exactly those 3 groups."""
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 9, 3, bias=False)
    patterns = [torch.tensor([1.0] * 4 + [0.0] * 8), torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4),
                torch.tensor([0.0] * 8 + [1.0] * 4)]
    truth = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    with torch.no_grad():
        for i, p in enumerate(truth):
            conv.weight[i] = patterns[p][:, None, None] * (1 + 0.01 * torch.rand(12, 3, 3))
    entry = self_group_entry(conv, k=3, cp=0.5, seed=0)
    assert entry["groups"] == truth  # canonical labels: groups numbered by first filter
    assert entry["inputs"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_k_capped_deterministic_and_validated():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    entry = self_group_entry(conv, k=16, cp=0.5)
    assert len(entry["inputs"]) <= 4 and len(entry["groups"]) == 4
    assert self_group_entry(conv, k=3, seed=7) == self_group_entry(conv, k=3, seed=7)
    with pytest.raises(ap.ModelError, match="output channels"):
        DiverseGroupConv.from_conv(conv, [0, 0, 0], [[0]])
    with pytest.raises(ap.ModelError, match="no filters"):
        DiverseGroupConv.from_conv(conv, [0, 0, 0, 0], [[0], [1]])
    with pytest.raises(ap.ModelError, match="sorted"):
        DiverseGroupConv.from_conv(conv, [0, 0, 0, 0], [[3, 1]])
    with pytest.raises(ap.ModelError, match="dense"):
        self_group(nn.Conv2d(8, 8, 3, groups=8))


def test_state_dict_roundtrip_and_trace(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)).eval()
    grouped, spec = self_group_model(model, "all", k=4, cp=0.6, seed=0)
    assert list(spec) == ["2", "4"]
    assert isinstance(model[2], nn.Conv2d)  # the original is untouched
    with torch.no_grad():  # weights different from any fresh model's
        for p in grouped.parameters():
            p.add_(0.1)
    x = torch.randn(2, 3, 12, 12)
    y = grouped(x)
    path = tmp_path / "g.pt"
    torch.save({"spec": json.loads(json.dumps(spec)), "state_dict": grouped.state_dict()}, path)
    data = torch.load(path, weights_only=True)
    torch.manual_seed(5)
    fresh = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)).eval()
    rebuilt = apply_self_grouping(fresh, data["spec"])
    rebuilt.load_state_dict(data["state_dict"])
    assert torch.equal(rebuilt(x), y)
    traced = torch.jit.trace(grouped, x)
    torch.testing.assert_close(traced(x), y)


@pytest.fixture(scope="module")
def pruned_resnet():
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=10).eval()
    x = torch.randn(1, 3, 16, 16)
    space = ap.Space(model, x)
    widths = {u.name: max(u.min_width, u.round(u.width * 0.6)) for u in space.units}
    pruned = ap.select(space, widths).apply(model).eval()
    return space, widths, pruned, x


def test_composes_with_channel_pruning(pruned_resnet):
    space, widths, pruned, x = pruned_resnet
    grouped, spec = self_group_model(pruned, "all", k=4, cp=0.5, seed=0)
    assert set(spec) == set(eligible_convs(pruned))
    assert "conv1" not in spec  # RGB stem is not grouped
    assert not any(name.endswith("shortcut.0") for name in spec)  # small 1x1 projections
    assert sum(isinstance(m, DiverseGroupConv) for m in grouped.modules()) == len(spec) > 10
    # exactness: the grouped network equals the pruned network with masked dense convs
    masked = copy.deepcopy(pruned)
    for name, entry in spec.items():
        parent, _, child = name.rpartition(".")
        setattr(masked.get_submodule(parent), child, masked_dense(pruned.get_submodule(name), entry))
    xb = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(grouped(xb), masked(xb), rtol=1e-4, atol=1e-4)
    # cost: the delta equals fvcore's difference, and the Plan integration formula holds
    dense, small = ap.fvcore_cost(pruned, x), ap.fvcore_cost(grouped, x)
    delta = selfgroup_cost_delta(pruned, spec, x)
    assert delta.flops > 0 and delta.params > 0
    assert (dense.flops - small.flops, dense.params - small.params) == tuple(delta)
    assert selfgroup_cost_delta(grouped, spec, x) == delta
    analytic = space.cost(widths)
    assert (analytic.flops - delta.flops, analytic.params - delta.params) == tuple(small)
    # a batch of 2 doubles the FLOPs delta, not the params one
    delta2 = selfgroup_cost_delta(pruned, spec, torch.randn(2, 3, 16, 16))
    assert delta2 == (2 * delta.flops, delta.params)


def test_pruned_grouped_reapply_and_errors(pruned_resnet):
    _, _, pruned, x = pruned_resnet
    names = eligible_convs(pruned)[:3]
    grouped, spec = self_group_model(pruned, names, k={n: 2 + i for i, n in enumerate(names)},
                                     cp=0.4, seed=1)
    assert [len(spec[n]["inputs"]) <= 2 + i for i, n in enumerate(names)] == [True] * 3
    again = apply_self_grouping(pruned, spec)
    again.load_state_dict(grouped.state_dict())
    with torch.no_grad():
        assert torch.equal(again(x), grouped(x))
    with pytest.raises(ap.ModelError, match="lacks"):
        apply_self_grouping(pruned, {"layer9.conv1": spec[names[0]]})
    with pytest.raises(ap.ModelError, match="dense"):
        apply_self_grouping(grouped, spec)  # already grouped
    wrong = {names[0]: {"groups": [0] * 3, "inputs": [[0]]}}
    with pytest.raises(ap.ModelError, match=names[0]):
        apply_self_grouping(pruned, wrong)


def test_plan_with_selfgroup_survives_save_load(pruned_resnet, tmp_path):
    space, widths, pruned, x = pruned_resnet
    plan = ap.select(space, widths)
    grouped, spec = self_group_model(pruned, "all", k=4, cp=0.5, seed=0)
    plan.selfgroup = spec
    rebuilt = plan.apply(space.model)  # channel pruning, then the same self-grouping
    rebuilt.load_state_dict(grouped.state_dict())
    plan.save(tmp_path / "g.pt", rebuilt)
    again = ap.load(tmp_path / "g.pt")
    assert sum(isinstance(m, DiverseGroupConv) for m in again.modules()) == len(spec)
    xb = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(xb), grouped.eval()(xb))
    assert json.loads(plan.to_json())["selfgroup"] == json.loads(json.dumps(spec))
    delta = selfgroup_cost_delta(pruned, spec, x)
    analytic = space.cost(plan.kept_widths())
    assert ap.fvcore_cost(again, x) == (analytic.flops - delta.flops, analytic.params - delta.params)
