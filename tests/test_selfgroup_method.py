"""Method ``selfgroup`` (SG-CNN through prune): the budget met on the grouped model as fvcore
counts it, exactly the masked dense layers, FC grouping, save/load, options and compare."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch import nn

import autoprune as ap
from autoprune import methods, pipeline
from autoprune.cli import main
from autoprune.compare import compare
from autoprune.errors import BudgetError, OptionError
from autoprune.selfgroup import (
    DiverseGroupConv, DiverseGroupLinear, apply_self_grouping, connection_costs, eligible_convs,
    eligible_layers, fit_cp, self_group, self_group_model,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation in fvcore

SIZE = 8


def masked_dense(layer: nn.Module, entry: dict) -> nn.Module:
    """Independent reference: the dense ``layer`` with W[i, j] = 0 for j ∉ S_{g(i)}."""
    ref = copy.deepcopy(layer)
    mask = torch.zeros(ref.weight.shape[:2])
    for i, g in enumerate(entry["groups"]):
        mask[i, entry["inputs"][g]] = 1
    with torch.no_grad():
        ref.weight.mul_(mask.view(*mask.shape, *[1] * (ref.weight.dim() - 2)))
    return ref


def kept_connections(entry: dict) -> int:
    """Σ_g |S_g|·|G_g|, counting each filter's set directly."""
    return sum(len(entry["inputs"][g]) for g in entry["groups"])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    data = ap.data.load("digits", image_size=SIZE)
    model = ap.models.create("resnet20", num_classes=10).eval()
    return model, data


@pytest.fixture(scope="module")
def pruned(tiny, tmp_path_factory):
    """One prune(method="selfgroup") at flops<=50%, written to disk (no fine-tuning: the
    grouped weights are the dense model's own)."""
    model, data = tiny
    out = tmp_path_factory.mktemp("sg")
    result = ap.prune(model, data, "flops<=50%", method="selfgroup", finetune_epochs=0, bn_batches=2,
                      progress=False, out=out)
    return result, out


def test_prune_meets_the_flops_budget_on_the_grouped_model(tiny, pruned):
    model, data = tiny
    result, _ = pruned
    x = torch.zeros(1, *data.input_shape)
    base = ap.fvcore_cost(model, x)
    target = math.floor(0.5 * base.flops)
    got = ap.fvcore_cost(result.model, x)
    # At or below the target, within 1%: cp is one ratio for every layer, so the cost moves
    # one (group, input) connection at a time; the largest such step here is
    # |G_g|·9·H·W <= 16·9·64 FLOPs = 0.36% of the base (asserted below), far inside 1%.
    assert got.flops <= target and got.flops >= 0.99 * target
    report, info = result.report, result.report["selfgroup"]
    assert report["budget"]["realized"] == report["pruned"]["flops"] == got.flops
    assert report["budget"]["realized_channels"] == base.flops  # widths alone: nothing removed
    assert report["budget"]["target"] == info["target"] == target
    assert info["realized"] == got.flops  # the fit's exact arithmetic is fvcore's count
    assert report["method"] == "selfgroup" and info["k"] == 16 and 0 < info["cp"] < 1
    # no channel removed: every unit at full width, the Plan keeps every channel
    assert result.plan.keep == {} and all(kept == width for kept, width in report["widths"].values())
    # SG-CNN's layers: the convs but the stem and the 16-input projection, and the classifier
    spec = result.plan.selfgroup
    assert list(spec) == eligible_layers(model) == info["convs"] + info["linears"]
    assert "conv1" not in spec and "layer2.0.shortcut.0" not in spec and info["linears"] == ["fc"]
    assert all(isinstance(result.model.get_submodule(n), DiverseGroupConv) for n in info["convs"])
    assert isinstance(result.model.fc, DiverseGroupLinear)
    # closest to the target: a slightly smaller cp (one more connection) exceeds it
    costs = connection_costs(model, spec, x)
    step = max(costs[n].flops * sum(1 for g in e["groups"] if g == gi)
               for n, e in spec.items() for gi in range(len(e["inputs"])))
    assert step <= 0.0036 * base.flops and target - got.flops < step
    richer, _ = self_group_model(model, list(spec), k=16, cp=info["cp"] - 1e-9, seed=0)
    assert ap.fvcore_cost(richer, x).flops > target


def test_grouped_layers_compute_the_masked_dense_layers(tiny, pruned):
    model, _ = tiny
    result, _ = pruned
    torch.manual_seed(1)
    for name, entry in result.plan.selfgroup.items():
        dense, grouped = model.get_submodule(name), result.model.get_submodule(name)
        x = torch.randn(2, dense.in_channels, 6, 6) if isinstance(dense, nn.Conv2d) else torch.randn(3, 64)
        with torch.no_grad():
            torch.testing.assert_close(grouped(x), masked_dense(dense, entry)(x), rtol=1e-5, atol=1e-5)
        # a real smaller computation: the weights hold only the kept connections
        kernel = dense.weight[0, 0].numel()
        assert sum(p.numel() for n, p in grouped.named_parameters() if n.startswith("weight_")) \
            == kept_connections(entry) * kernel < dense.weight.numel()


@pytest.mark.parametrize("cp", [0.0, 0.4, 0.8, 1.0])
def test_fc_grouping_equals_the_masked_dense_linear(cp):
    torch.manual_seed(0)
    linear = nn.Linear(40, 12)
    grouped = self_group(linear, k=4, cp=cp, seed=2)
    assert isinstance(grouped, DiverseGroupLinear)
    entry = grouped.spec_entry()
    assert len(entry["inputs"]) == 4 and sorted(set(entry["groups"])) == [0, 1, 2, 3]
    ref = masked_dense(linear, entry)
    for x in (torch.randn(5, 40), torch.randn(2, 3, 40)):
        with torch.no_grad():
            torch.testing.assert_close(grouped(x), ref(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grouped.to_dense()(x), ref(x), rtol=1e-5, atol=1e-6)
    kept = kept_connections(entry)
    assert kept == 40 * 12 if cp == 0 else kept < 40 * 12
    if cp == 1.0:
        assert all(len(s) == 1 for s in entry["inputs"])
    # fvcore counts the grouped matmuls only: Σ|S_g|·|G_g| per row; params likewise, plus biases
    assert ap.fvcore_cost(grouped, torch.randn(5, 40)) == (5 * kept, kept + 12)


def test_fc_spec_rebuilds_from_a_fresh_model_and_state_dict():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    grouped, spec = self_group_model(net, ["0", "2"], k=5, cp=0.6, seed=0)
    with torch.no_grad():
        for p in grouped.parameters():
            p.add_(0.1)
    torch.manual_seed(9)
    fresh = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 6)).eval()
    rebuilt = apply_self_grouping(fresh, spec)
    rebuilt.load_state_dict(grouped.state_dict())
    x = torch.randn(4, 48)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), grouped(x))


def test_saved_model_reloads_with_identical_outputs(pruned):
    result, out = pruned
    raw = torch.load(out / "model.pt", weights_only=True)  # plain tensors and JSON data only
    assert raw["plan"]["selfgroup"] == result.plan.selfgroup
    again = ap.load(out / "model.pt")
    assert sum(isinstance(m, (DiverseGroupConv, DiverseGroupLinear)) for m in again.modules()) \
        == len(result.plan.selfgroup)
    x = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(again(x), result.model.eval()(x))


def test_params_budget_and_compute_accounting(tiny):
    model, data = tiny
    x = torch.zeros(1, *data.input_shape)
    space = ap.Space(model, x)
    budget = ap.Budget.parse("params<=60%")
    result = methods.get("selfgroup").widths(space, budget, methods.Context(model, data, space, budget))
    assert result.info["compute"] == {"proxy_evaluations": 0}
    assert result.widths == {u.name: u.width for u in space.units}
    params = ap.fvcore_cost(result.plan.apply(model), x).params
    target = budget.target(space)
    assert 0.99 * target <= params <= target and result.info["selfgroup"]["realized"] == params
    # params per connection are the kernel size: the same cut, recounted from the spec
    dense = ap.fvcore_cost(model, x).params
    weights = {n: model.get_submodule(n).weight for n in result.plan.selfgroup}
    saved = sum((weights[n].shape[0] * weights[n].shape[1] - kept_connections(e)) * weights[n][0, 0].numel()
                for n, e in result.plan.selfgroup.items())
    assert dense - saved == params


def test_unreachable_budget_names_the_least_reachable(tiny):
    model, data = tiny
    x = torch.zeros(1, *data.input_shape)
    base = ap.fvcore_cost(model, x).flops
    names = eligible_convs(model)
    with pytest.raises(BudgetError, match=r"use at least flops<=\d+\.\d\d%") as info:
        fit_cp(model, names, "flops", base // 50, base, x, k=4)
    least = float(str(info.value).rsplit("<=", 1)[1].rstrip("%")) / 100
    fit = fit_cp(model, names, "flops", math.floor(least * base), base, x, k=4)
    assert fit.cost <= least * base and fit.cp > 0.9
    with pytest.raises(BudgetError):  # the named bound is the least one in steps of 0.01%
        fit_cp(model, names, "flops", math.floor((least - 1e-4) * base), base, x, k=4)
    # at cp = 1 every group keeps one input: the cost is the stem and the rest, plus one input per filter
    ones = fit_cp(model, names, "flops", 1 + base - sum(c.flops * (c.dense - c.dense // model.get_submodule(n).in_channels)
                                                       for n, c in connection_costs(model, names, x).items()),
                  base, x, k=4)
    assert all(len(s) == 1 for e in ones.spec.values() for s in e["inputs"])


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16", None])
def test_sg_k_is_checked_before_any_work(bad):
    with pytest.raises(OptionError, match="sg_k") as info:
        pipeline.check_options("selfgroup", sg_k=bad)
    assert "\n" not in str(info.value)
    with pytest.raises(OptionError, match="sg_k"):  # no model or data needed: refused first
        ap.prune(None, None, "flops<=50%", method="selfgroup", sg_k=bad)


def test_cli_sg_k_reaches_prune_and_bad_values_are_one_line(prune_call, capsys, tmp_path):
    argv = ["prune", "--model", "resnet20", "--data", "synthetic", "--flops", "50%", "--out", str(tmp_path / "x"),
            "--method", "selfgroup"]
    kw = prune_call([*argv, "--sg-k", "4"])
    assert (kw["method"], kw["sg_k"]) == ("selfgroup", 4)
    kw = prune_call(argv)
    assert (kw["method"], kw["sg_k"]) == ("selfgroup", 16)  # the default
    assert main([*argv, "--sg-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sg-k" in err[0]


def test_compare_runs_selfgroup(tiny, tmp_path):
    model, data = tiny
    results = compare(model, data, budgets=("flops<=60%",), methods=("selfgroup",), seeds=(0,),
                      finetune_epochs=0, bn_batches=2, progress=False, out=tmp_path)
    base = ap.fvcore_cost(model, torch.zeros(1, *data.input_shape)).flops
    (row,) = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert row["method"] == "selfgroup" and results["rows"][0]["method"] == "selfgroup"
    assert 0.99 * math.floor(0.6 * base) <= int(row["flops"]) <= math.floor(0.6 * base)
