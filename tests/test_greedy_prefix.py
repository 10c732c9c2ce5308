"""Prefix reuse in the greedy's candidate evaluations (issue 12, speed): exact, and it skips work.

Every assertion compares with the same evaluation recomputed without reuse."""

import itertools

import pytest
import torch
import torchvision

import autoprune as ap
from autoprune import evaluate, greedy_masks
from autoprune.data import loader
from autoprune.greedy import greedy_widths
from autoprune.greedy_masks import MaskedEvaluator, channel_masks
from autoprune.greedy_prefix import ExecutionOrder, record, replay


def _cut(space, unit, keep):
    """A 0/1 mask keeping the first ``keep`` channels of ``unit``."""
    m = torch.zeros(space.unit(unit).width)
    m[:keep] = 1
    return m


def test_clean_modules_are_those_finished_before_the_units_first_masked_output():
    model = ap.models.create("resnet20", num_classes=10).eval()
    space = ap.Space(model, torch.zeros(1, 3, 8, 8))
    order = ExecutionOrder(model, torch.zeros(2, 3, 8, 8))
    # an internal unit of the last stage: the stem, both earlier stages, the earlier blocks
    # of its stage and its own first conv (its mask acts at layer3.2.bn1's output)
    assert order.clean(space.unit("layer3.2.conv1")) == [
        "conv1", "bn1", "layer1", "layer2", "layer3.0", "layer3.1", "layer3.2.conv1"]
    # the first stage's residual stream is masked at the stem's own norm: only the stem conv
    assert order.clean(space.unit("conv1")) == ["conv1"]
    # a stream unit of stage 3: its block's shortcut runs after bn2, so it is not clean
    clean = order.clean(space.unit("layer3.0.conv2"))
    assert "layer3.0.shortcut.0" not in clean and "layer3.0.conv2" in clean and "layer2" in clean


def _torchvision_candidates(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(4, 3, 32, 32)
    space = ap.Space(model, x[:1])
    base = {space.units[1].name: _cut(space, space.units[1].name, 40)}
    candidates = []
    for unit in space.units:
        masks = dict(base)
        masks[unit.name] = _cut(space, unit.name, unit.width // 2)
        candidates.append((unit.name, masks))
    return model, space, x, base, candidates


def test_replay_reproduces_the_logits_bit_for_bit_and_skips_the_prefix(monkeypatch):
    """torchvision's ResNet-18: in-place ReLUs and a ReLU module shared within each block
    (called twice). For every unit, replaying its clean prefix from one recording of the
    committed structure gives the candidate's logits exactly, and the convolutions inside the
    replayed modules are never computed (counted at ``torch.nn.functional.conv2d``)."""
    model, space, x, base, candidates = _torchvision_candidates()
    order = ExecutionOrder(model, x)
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    computed = []
    conv2d = torch.nn.functional.conv2d
    monkeypatch.setattr(torch.nn.functional, "conv2d", lambda *a, **k: computed.append(1) or conv2d(*a, **k))
    skipped = 0
    with torch.no_grad():
        for unit, masks in candidates:
            plan = order.clean(space.unit(unit))
            with channel_masks(model, space, masks):
                expected = model(x)
            with channel_masks(model, space, base), record(model, plan) as cache:
                model(x)
            computed.clear()
            with channel_masks(model, space, masks), replay(model, plan, cache):
                got = model(x)
            assert torch.equal(got, expected), unit
            inside = [c for c in convs if any(c == p or c.startswith(p + ".") for p in plan)]
            assert len(computed) == len(convs) - len(inside), unit
            skipped += bool(inside)
    assert skipped >= len(candidates) - 1  # only the stem's unit has no conv before it


def test_replay_refuses_more_calls_than_recorded():
    model = ap.models.create("resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), record(model, ["layer1"]) as cache:
        model(x)
    with torch.no_grad(), replay(model, ["layer1"], cache):
        model(x)
        with pytest.raises(RuntimeError, match="layer1 called more often"):
            model(x)
    assert "forward" not in vars(model.get_submodule("layer1"))  # the class's forward is back


def _evaluator(model, data, reuse, bn_batches=2):
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    val = list(itertools.islice(loader(data.val, batch_size=64), 3))
    train = list(itertools.islice(loader(data.train, batch_size=32, shuffle=True, seed=0), bn_batches))
    ev = MaskedEvaluator(model, space, val, train, bn_fn=lambda m, b: evaluate.adaptive_bn(m, b),
                         reuse_prefix=reuse)
    return ev, space


@pytest.mark.parametrize("cap_mb", [None, 0])
def test_many_equals_one_candidate_at_a_time(trained, monkeypatch, cap_mb):
    """A trained ResNet-20, adaptive BN per candidate, a committed structure with two units
    cut: every candidate's accuracy from ``many`` (prefix reused) equals ``__call__``'s,
    also when the training-batch recording is over the memory cap (then recomputed), and
    the evaluator's own BN statistics are unchanged afterwards."""
    if cap_mb is not None:
        monkeypatch.setattr(greedy_masks, "PREFIX_CACHE_MB", cap_mb)
    model, data = trained
    ev, space = _evaluator(model, data, reuse=True)
    base = {"layer1.1.conv1": _cut(space, "layer1.1.conv1", 6), "layer2.0.conv2": _cut(space, "layer2.0.conv2", 20)}
    candidates = []
    for unit in space.units:
        masks = dict(base)
        masks[unit.name] = _cut(space, unit.name, max(1, int(base.get(unit.name, torch.ones(unit.width)).sum()) - 4))
        candidates.append((unit.name, masks))
    before = {k: v.clone() for k, v in ev.model.state_dict().items()}
    fast = ev.many(base, candidates)
    after = ev.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    slow = [ev(masks) for _, masks in candidates]
    assert fast == slow
    assert len(set(slow)) > 1  # the candidates differ: the equality is not between constants
    assert ev.prefix["train_cache"] is (cap_mb is None)
    assert ev.prefix["reused"] == len(candidates)  # every ResNet-20 unit has the stem before it
    assert ev.evaluations == 2 * len(candidates)


def test_greedy_walk_is_identical_with_and_without_prefix_reuse(trained):
    """The authors' accuracy-mode walk, screened, commits the same steps with the same
    accuracies whether or not candidates replay their prefix."""
    model, data = trained
    walks = []
    for reuse in (False, True):
        ev, space = _evaluator(model, data, reuse)
        scores = {u.name: torch.arange(u.width, dtype=torch.float64) for u in space.units}
        result = greedy_widths(space, scores, "flops<=90%", step=0.03, mode="accuracy", evaluator=ev,
                               progress=False, screen=3)
        walks.append(([(t["unit"], t["kept"], t["proxy"], t.get("screened")) for t in result.trajectory],
                      result.widths, ev.evaluations))
    assert walks[0] == walks[1]
    assert len(walks[0][0]) >= 3
