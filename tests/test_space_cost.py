"""Space, analytic cost, budget fitting and Plan apply/save/load on the model zoo.

The analytic cost of fitted widths must equal fvcore's count on the physically
pruned network, and every fitted structure must meet its budget within 0.5%.
"""

import random

import pytest
import torch

import autoprune as ap
from autoprune.budget import TOLERANCE

FAST = ["resnet20", "resnet56", "vgg16_bn", "torchvision/resnet18", "mobilenet_v3_small"]
SLOW = ["resnet110", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121",
        "regnet_x_400mf", "googlenet", "convnext_tiny"]
BUDGETS = ["flops<=70%", "flops<=50%", "flops<=30%", "params<=50%"]
MODELS = FAST + [pytest.param(m, marks=pytest.mark.slow) for m in SLOW]


@pytest.fixture(scope="module", params=MODELS)
def zoo(request):
    torch.manual_seed(0)
    model = ap.models.create(request.param, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, ap.Space(model, x[:1])


def test_full_cost_equals_fvcore(zoo):
    model, x, space = zoo
    assert space.cost() == ap.fvcore_cost(model, x[:1])


@pytest.mark.parametrize("budget", BUDGETS)
def test_fit_apply_matches_fvcore(zoo, budget, tmp_path):
    model, x, space = zoo
    rng = random.Random(hash(budget) % 1000)
    ratios = {u.name: rng.uniform(0.0, 0.8) for u in space.units}
    widths = space.fit(ratios, budget)
    b = ap.Budget.parse(budget)
    target = b.target(space)
    realized = getattr(space.cost(widths), b.kind)
    assert target * (1 - TOLERANCE) <= realized <= target
    assert all(space.unit(n).allowed(k) for n, k in widths.items())

    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = ap.select(space, widths)
    small = plan.apply(model).eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert small(x).shape == model(x).shape
    assert ap.fvcore_cost(small, x[:1]) == space.cost(widths)

    if budget == "flops<=50%":
        plan.save(tmp_path / "m.pt", small)
        again = ap.load(tmp_path / "m.pt")
        with torch.no_grad():
            torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
