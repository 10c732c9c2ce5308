"""Budget parsing and errors, fitting invariants, and channel selection rules."""

import numpy as np
import pytest
import torch

import autoprune as ap
from autoprune.plan import _proportional


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    return ap.Space(ap.models.create("resnet20", num_classes=10).eval(), torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("text,kind,value,relative", [
    ("flops<=50%", "flops", 0.5, True), ("flops<=0.5", "flops", 0.5, True),
    ("flops<=62M", "flops", 62e6, False), ("params<=1.2M", "params", 1.2e6, False),
    (" params <= 100% ", "params", 1.0, True), ("flops<=3G", "flops", 3e9, False),
])
def test_parse(text, kind, value, relative):
    b = ap.Budget.parse(text)
    assert (b.kind, b.relative) == (kind, relative)
    assert b.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["flops<50%", "mem<=5M", "flops<=0%", "flops<=150%", "flops<=-1",
                                  "", "flops<=abc", "flops<=0"])
def test_parse_rejects(text):
    with pytest.raises(ap.BudgetError, match="budget"):
        ap.Budget.parse(text)


def test_unreachable_budget_names_smallest(space):
    smallest = space.cost(space.min_widths()).flops / space.cost().flops
    with pytest.raises(ap.BudgetError, match=r"smallest reachable.*flops<=\d"):
        ap.Budget.parse("flops<=0.1%").target(space)
    assert ap.Budget.parse(f"flops<={smallest * 100 + 0.01:.4f}%").target(space) > 0
    with pytest.raises(ap.BudgetError, match="exceeds"):
        ap.Budget.parse("params<=100M").target(space)


def test_fit_keeps_unratioed_units_whole(space):
    names = space.unit_names
    ratios = {n: 0.5 for n in names[::2]}
    widths = space.fit(ratios, "flops<=85%")
    assert all(widths[n] == space.unit(n).width for n in names[1::2])
    assert any(widths[n] < space.unit(n).width for n in names[::2])


def test_fit_preserves_shape_order(space):
    names = space.unit_names
    ratios = {n: 0.1 + 0.7 * i / len(names) for i, n in enumerate(names)}
    widths = space.fit(ratios, "flops<=60%")
    kept = np.array([widths[n] / space.unit(n).width for n in names])
    # more pruning asked → no more kept (up to one channel of rounding)
    slack = np.array([1 / space.unit(n).width for n in names])
    assert all(kept[i + 1] <= kept[i] + slack[i] + slack[i + 1] for i in range(len(names) - 1))


def test_fit_rejects_bad_ratios(space):
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        space.fit({space.unit_names[0]: 1.5}, "flops<=50%")
    with pytest.raises(ap.ModelError, match="no prunable unit"):
        space.fit({"nope": 0.5}, "flops<=50%")


def test_select_keeps_top_scores(space):
    unit = space.units[0]
    scores = {u.name: torch.arange(u.width, dtype=torch.float) for u in space.units}
    plan = ap.select(space, {unit.name: 5}, scores=scores)
    assert plan.keep == {unit.name: list(range(unit.width - 5, unit.width))}


def test_select_clusters_proportional(space):
    unit = space.units[0]  # 16 channels
    labels = np.array([0] * 12 + [1] * 3 + [2])
    scores = {unit.name: torch.arange(unit.width, dtype=torch.float)}
    plan = ap.select(space, {unit.name: 8}, scores=scores, clusters={unit.name: labels})
    keep = np.array(plan.keep[unit.name])
    counts = np.bincount(labels[keep], minlength=3)
    assert counts.tolist() == [6, 1, 1]
    assert keep[labels[keep] == 0].tolist() == [6, 7, 8, 9, 10, 11]  # top of cluster 0


@pytest.mark.parametrize("sizes,kept,expected", [
    ([12, 3, 1], 8, [6, 1, 1]), ([5, 5], 4, [2, 2]), ([4, 4, 4], 2, [1, 1, 0]),
    ([10, 1], 11, [10, 1]), ([2, 2, 2, 2], 5, [2, 1, 1, 1]),
])
def test_proportional_allocation(sizes, kept, expected):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    alloc = _proportional(labels, kept)
    assert sum(alloc.values()) == kept
    assert [alloc[i] for i in range(len(sizes))] == expected


def test_grouped_conv_units_keep_same_local_indices():
    model = ap.models.create("regnet_x_400mf", num_classes=10).eval()
    space = ap.Space(model, torch.randn(1, 3, 32, 32))
    unit = next(u for u in space.units if u.groups > 1)
    half = unit.width // 2 // unit.step * unit.step
    plan = ap.select(space, {unit.name: half})
    size = unit.width // unit.groups
    local = [sorted(i % size for i in plan.keep[unit.name] if i // size == g) for g in range(unit.groups)]
    assert all(loc == local[0] for loc in local)
    small = plan.apply(model)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_load_rejects_truncated_and_foreign(tmp_path, space):
    model = space.model
    plan = ap.select(space, {space.unit_names[0]: 8})
    small = plan.apply(model)
    plan.save(tmp_path / "m.pt", small)
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ap.CheckpointError, match="unreadable"):
        ap.load(tmp_path / "t.pt")
    with pytest.raises(ap.CheckpointError, match="does not fit"):
        ap.load(tmp_path / "m.pt", model=ap.models.create("resnet32", num_classes=10))
    with pytest.raises(ap.CheckpointError, match="does not exist"):
        ap.load(tmp_path / "missing.pt")


def test_plan_json_round_trip(space):
    plan = ap.select(space, {space.unit_names[1]: 4})
    import json
    data = json.loads(plan.to_json())
    assert data["units"][space.unit_names[1]]["kept"] == 4
    again = ap.Plan.from_dict(plan.to_dict())
    assert again.keep == plan.keep and again.input_shape == plan.input_shape


class _Untraceable(torch.nn.Module):
    """Runs without gradients (a plain forward) but not under Torch-Pruning's traced forward."""

    def forward(self, x):
        if x.requires_grad:
            raise RuntimeError("op without autograd support")
        return x


def test_untraceable_model_error_names_the_module():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3), _Untraceable()))
    with torch.no_grad():
        model(torch.zeros(1, 3, 8, 8))  # fine without tracing
    with pytest.raises(ap.ModelError, match=r"in module '2\.1' \(_Untraceable\).*without autograd"):
        ap.Space(model, torch.zeros(1, 3, 8, 8))


def test_load_into_a_user_supplied_model(tmp_path):
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 16, 16)
    space = ap.Space(model, x[:1])
    plan = ap.select(space, space.fit({u.name: 0.4 for u in space.units}, "flops<=60%"))
    small = plan.apply(model)
    plan.save(tmp_path / "small.pt", small)
    fresh = ap.models.create("resnet20", num_classes=10)  # other random weights, same architecture
    again = ap.load(tmp_path / "small.pt", model=fresh)
    assert torch.equal(again(x), small.eval()(x))
    assert ap.fvcore_cost(again, x[:1]) == ap.fvcore_cost(small, x[:1])


def test_round_to_keeps_widths_on_multiples():
    model = ap.models.create("resnet20", num_classes=10)
    space = ap.Space(model, torch.zeros(1, 3, 16, 16), round_to=8)
    assert all(u.step % 8 == 0 for u in space.units)
    widths = space.fit({u.name: 0.5 for u in space.units}, "flops<=50%")
    assert all(widths[u.name] % 8 == 0 for u in space.units)
    assert space.cost(widths).flops <= 0.5 * space.cost().flops
    small = ap.select(space, widths).apply(model)
    assert ap.fvcore_cost(small, torch.zeros(1, 3, 16, 16)) == space.cost(widths)
