"""Torch-Pruning's global magnitude baseline: same budget, identical to TP's own model."""

import pytest
import torch

import autoprune as ap
from autoprune.tp_baseline import tp_global_plan, tp_pruned_model


@pytest.mark.parametrize("name,budget", [("resnet20", "flops<=50%"), ("vgg16_bn", "params<=40%")])
def test_tp_global_plan_equals_tp_model(name, budget):
    torch.manual_seed(0)
    model = ap.models.create(name, num_classes=10).eval()
    space = ap.Space(model, torch.zeros(1, 3, 16, 16))
    plan = tp_global_plan(space, budget)
    b = ap.Budget.parse(budget)
    realized = getattr(space.cost(plan.kept_widths()), b.kind)
    assert realized <= b.target(space)
    assert realized >= 0.97 * b.target(space)
    ours = plan.apply(model).eval()
    theirs = tp_pruned_model(space, plan.meta["pruning_ratio"]).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    assert ap.fvcore_cost(ours, x[:1]) == ap.fvcore_cost(theirs, x[:1]) == space.cost(plan.kept_widths())
    # global: pruning is not uniform across units
    kept = [k / space.unit(n).width for n, k in plan.kept_widths().items()]
    assert max(kept) - min(kept) > 0.05
