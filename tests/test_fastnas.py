"""Method fastnas (NVIDIA ModelOpt's FastNAS as a peer arm): the Plan read back from a pruned,
channel-permuted copy; the one-line refusal without the ``peers`` extra; and (slow, with the
extra) a real FastNAS run through ``prune`` at flops<=50%, recounted with fvcore and compared
with FastNAS's own network."""

from __future__ import annotations

import itertools
import json
import os
import sys

import pytest
import torch

import autoprune as ap
from autoprune import methods, pipeline
from autoprune.cost import fvcore_cost
from autoprune.errors import ModelError, OptionError
from autoprune.evaluate import adaptive_bn
from autoprune.methods.fastnas import FastNAS
from autoprune.models.cifar import CifarResNet
from autoprune.peers.recover import check_reproduces, recover_plan
from autoprune.plan import Plan

INSTALL = 'pip install -e ".[peers]"'


def _tiny(seed: int = 0) -> torch.nn.Module:
    """A CIFAR-style ResNet-8 (one block per stage) with random BN affine parameters."""
    torch.manual_seed(seed)
    model = CifarResNet(8, num_classes=4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _permuted(model: torch.nn.Module, shape, seed: int) -> torch.nn.Module:
    """``model`` with the channels of every unit shuffled in place (as FastNAS sorts them): the
    producing layers' rows and norms, the consumers' input columns; the function is unchanged."""
    space = ap.Space(model, torch.zeros(shape))
    gen = torch.Generator().manual_seed(seed)
    for unit in space.units:
        perm = torch.randperm(unit.width, generator=gen)
        for name in unit.modules:
            layer = model.get_submodule(name)
            layer.weight.data = layer.weight.data[perm]
            if layer.bias is not None:
                layer.bias.data = layer.bias.data[perm]
        for name in unit.norms:
            norm = model.get_submodule(name)
            for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
                tensor.data = tensor.data[perm]
        for name, positions, channels in unit.consumers:
            assert list(positions) == list(channels) == list(range(unit.width))  # a plain ResNet
            layer = model.get_submodule(name)
            layer.weight.data = layer.weight.data[:, perm]
    return model


@pytest.fixture
def dense_and_plan():
    model = _tiny()
    shape = (1, 3, 8, 8)
    space = ap.Space(model, torch.zeros(shape))
    gen = torch.Generator().manual_seed(1)
    widths = {u.name: int(torch.randint(1, u.width, (1,), generator=gen)) for u in space.units}
    scores = {u.name: torch.rand(u.width, generator=gen) for u in space.units}
    return model, space, ap.select(space, widths, scores=scores)


def test_recovered_plan_is_the_known_plan_of_a_permuted_copy(dense_and_plan):
    model, space, plan = dense_and_plan
    small = plan.apply(model)
    images = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        before = small(images)
    copy = _permuted(small, (1, 3, 8, 8), seed=2)
    with torch.no_grad():
        assert torch.allclose(copy(images), before, atol=1e-5)  # the shuffle keeps the function
    recovered = recover_plan(space, model, copy, "FastNAS")
    assert recovered.keep == plan.keep and recovered.widths == plan.widths
    assert all(len(k) < space.unit(n).width for n, k in recovered.keep.items())
    check_reproduces(recovered, model, copy, images, "FastNAS")


def test_a_copy_that_is_no_plan_is_refused_naming_the_layer(dense_and_plan):
    model, space, plan = dense_and_plan
    copy = _permuted(plan.apply(model), (1, 3, 8, 8), seed=3)
    # layer1.0.conv2 adds into the stem's channels (one unit with conv1): give it a row of its own
    copy.layer1[0].conv2.weight.data[0] = torch.randn_like(copy.layer1[0].conv2.weight.data[0])
    with pytest.raises(ModelError, match=r"layer layer1\.0\.conv2 keeps a channel") as info:
        recover_plan(space, model, copy, "FastNAS")
    assert "\n" not in str(info.value) and "not a Plan over autoprune's units" in str(info.value)


def test_a_wrong_plan_does_not_reproduce(dense_and_plan):
    model, _, plan = dense_and_plan
    copy = _permuted(plan.apply(model), (1, 3, 8, 8), seed=4)
    name = next(iter(plan.keep))
    other = sorted(set(range(plan.widths[name])) - set(plan.keep[name]))[:1] + plan.keep[name][1:]
    wrong = Plan({**plan.keep, name: sorted(other)}, plan.widths, plan.input_shape)
    with pytest.raises(ModelError, match="does not reproduce"):
        check_reproduces(wrong, model, copy, torch.randn(6, 3, 8, 8), "FastNAS")


def test_without_the_extra_fastnas_is_refused_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt", None)  # as if nvidia-modelopt were not installed
    reason = FastNAS.available()
    assert isinstance(reason, str) and "\n" not in reason and reason.endswith(INSTALL)
    assert methods.get("uniform").available() is None  # the base class: always available
    with pytest.raises(OptionError) as info:
        pipeline.check_options("fastnas")
    assert str(info.value) == reason
    data = ap.data.load("digits", image_size=8)
    with pytest.raises(OptionError) as info:  # refused before any work
        ap.prune(_tiny(), data, "flops<=50%", method="fastnas", progress=False)
    assert str(info.value) == reason


def test_without_the_extra_compare_skips_fastnas_with_one_line(monkeypatch, tmp_path, capsys):
    """compare runs every other arm and lists fastnas as skipped (the experiment scripts name it
    in every phase); the options of a method it skips are still checked, so a bad value is
    not silently ignored."""
    from autoprune.compare import check_options, compare

    monkeypatch.setitem(sys.modules, "modelopt", None)
    reason = FastNAS.available()
    assert check_options(["uniform", "fastnas"], fastnas_batches=64) == ["uniform", "fastnas"]
    for key, bad in (("fastnas_batches", 10), ("fastnas_divisor", 0)):
        with pytest.raises(OptionError, match=f"{key} must be an integer >= "):
            check_options(["uniform", "fastnas"], **{key: bad})
    data = ap.data.load("synthetic", image_size=8)
    results = compare(_tiny(), data, budgets=("flops<=60%",), methods=("uniform", "fastnas"), seeds=(0,),
                      finetune_epochs=0, out=tmp_path, progress=False, calib_images=16, bn_batches=1)
    assert [r["method"] for r in results["rows"]] == ["uniform"] and results["skipped"] == {"fastnas": reason}
    assert f"compare: skipping fastnas: {reason}\n" in capsys.readouterr().err


def test_options_are_checked_before_any_work(monkeypatch):
    monkeypatch.setattr(FastNAS, "available", classmethod(lambda cls: None))
    method = methods.get("fastnas")
    method.check({})
    method.check({"fastnas_batches": 64, "fastnas_divisor": 16})
    for bad in ({"fastnas_batches": 49}, {"fastnas_batches": True}, {"fastnas_batches": 50.0},
                {"fastnas_divisor": 0}):
        with pytest.raises(OptionError, match=next(iter(bad))):
            method.check(bad)


def _fake_runs(monkeypatch, space, offset, floor=0.0):
    """``run`` replaced by a stand-in FastNAS whose own count of a subnet's FLOPs is
    ``2 * (ours - offset * base)`` (a factor and an offset apart, as torchprofile's and ours): it
    lands on the largest uniform-ratio subnet within its limit (a percentage of its count of the
    dense model, or an absolute number), channels shuffled as FastNAS does; a limit below
    ``floor`` times its dense count is refused as ModelOpt does (BudgetError from the peer).
    Returns the (limit, checkpoint) calls."""
    import autoprune.methods.fastnas as fastnas_method
    from autoprune.budget import Budget
    from autoprune.errors import BudgetError
    from autoprune.peers.fastnas import Run

    monkeypatch.setattr(FastNAS, "available", classmethod(lambda cls: None))
    base = space.cost().flops
    calls = []

    def theirs(ours: float) -> float:
        return 2 * (ours - offset * base)

    def fake_run(model, data, kind, limit, *, batches, divisor, checkpoint, seed, progress):
        calls.append((limit, checkpoint))
        mine = float(limit[:-1]) / 100 * theirs(base) if isinstance(limit, str) else limit
        if mine < floor * theirs(base):
            raise BudgetError(f"FastNAS cannot reach {kind}<={limit} by its own count")
        lands = Budget(kind, min(1.0, (mine / 2 + offset * base) / base), True)
        widths = space.fit({u.name: 0.5 for u in space.units}, lands) if lands.value < 1 else {}
        pruned = _permuted(ap.select(space, widths).apply(model), (1, 3, 8, 8), len(calls))
        return Run(pruned, {kind: theirs(space.cost(space.complete(widths)).flops)}, 3)

    monkeypatch.setattr(fastnas_method, "run", fake_run)
    return calls


def test_the_next_limit_solves_a_linear_relation_between_the_counts():
    from autoprune.methods.fastnas import next_limit

    ours = lambda theirs: 1000 + 0.5 * theirs  # an offset and a factor apart
    one = [{"modelopt": 20000.0, "realized": ours(20000.0)}]
    assert next_limit(one, 10000) == pytest.approx(20000 * 10000 / 11000)  # one landing: scaled
    two = one + [{"modelopt": 18000.0, "realized": ours(18000.0)}]  # both over a target of 9000
    assert next_limit(two, 9000) == pytest.approx(16000)  # the line through both: exact, below 18000
    assert ours(next_limit(two, 9000)) == pytest.approx(9000)
    flat = one + [{"modelopt": 18000.0, "realized": 11000.0}]  # no rise: scaled from the last
    assert next_limit(flat, 10000) == pytest.approx(18000 * 10000 / 11000)


def test_an_overshoot_by_our_count_is_rerun_below_its_landing_from_the_checkpoint(monkeypatch, tmp_path):
    from autoprune.budget import Budget
    from autoprune.methods.fastnas import next_limit

    monkeypatch.chdir(tmp_path)
    model, data = _tiny(), ap.data.load("synthetic", image_size=8)
    space = ap.Space(model, torch.zeros(1, 3, 8, 8))
    calls = _fake_runs(monkeypatch, space, offset=0.05)  # its 50% is about 52.5% of ours
    budget = Budget.parse("flops<=50%")
    result = methods.get("fastnas").widths(space, budget, methods.Context(model, data, space, budget,
                                                                         progress=False))
    target, base = budget.target(space), space.cost().flops
    tried = result.info["fastnas"]["attempts"]
    assert [t["limit"] for t in tried] == [c[0] for c in calls] and tried[0]["limit"] == f"{100 * target / base!r}%"
    assert tried[0]["realized"] > target >= tried[-1]["realized"]
    # scaling the percentage by each overshoot converges slowly across an offset; the secant needs <= 3
    assert 2 <= len(tried) <= 3
    for k in range(1, len(tried)):  # each limit below the last landing, from the runs before it
        assert tried[k]["limit"] == pytest.approx(next_limit(tried[:k], target))
        assert tried[k]["limit"] < tried[k - 1]["modelopt"]
    assert space.cost(result.widths).flops == tried[-1]["realized"] == result.info["fastnas"]["realized"]["autoprune"]
    assert result.info["compute"] == {"proxy_evaluations": 3 * len(calls)}
    checkpoints = {c[1] for c in calls}  # one checkpoint, in a temporary folder removed afterwards
    assert len(checkpoints) == 1 and not any(tmp_path.iterdir())
    assert not os.path.exists(next(iter(checkpoints)))


def test_a_rerun_limit_below_its_smallest_subnet_is_raised_halfway_back(monkeypatch):
    import autoprune.methods.fastnas as fastnas_method
    from autoprune.budget import Budget
    from autoprune.errors import BudgetError

    model, data = _tiny(), ap.data.load("synthetic", image_size=8)
    space = ap.Space(model, torch.zeros(1, 3, 8, 8))
    _fake_runs(monkeypatch, space, offset=0.05, floor=0.2)  # its subnets: >= 20% of its own count
    monkeypatch.setattr(fastnas_method, "next_limit", lambda tried, target: 0.1 * tried[-1]["modelopt"])
    budget = Budget.parse("flops<=50%")
    result = methods.get("fastnas").widths(space, budget, methods.Context(model, data, space, budget,
                                                                         progress=False))
    tried = result.info["fastnas"]["attempts"]
    assert tried[0]["realized"] > budget.target(space) and tried[1].get("unsatisfiable")
    assert tried[2]["limit"] == pytest.approx((tried[1]["limit"] + tried[0]["modelopt"]) / 2)
    assert tried[-1]["realized"] == space.cost(result.widths).flops <= budget.target(space)
    # the budget itself below its smallest subnet: unreachable, raised from the first run
    _fake_runs(monkeypatch, space, offset=0.05, floor=0.9)
    with pytest.raises(BudgetError, match="cannot reach"):
        methods.get("fastnas").widths(space, budget, methods.Context(model, data, space, budget, progress=False))


def test_fastnas_always_over_the_budget_is_an_error(monkeypatch):
    from autoprune.budget import Budget
    from autoprune.errors import BudgetError
    from autoprune.methods.fastnas import ATTEMPTS

    model, data = _tiny(), ap.data.load("synthetic", image_size=8)
    space = ap.Space(model, torch.zeros(1, 3, 8, 8))
    calls = _fake_runs(monkeypatch, space, offset=0.6)  # its smallest limit is above ours at 50%
    budget = Budget.parse("flops<=50%")
    with pytest.raises(BudgetError, match="FastNAS overshot budget flops<=50%") as info:
        methods.get("fastnas").widths(space, budget, methods.Context(model, data, space, budget, progress=False))
    assert len(calls) == ATTEMPTS and "\n" not in str(info.value)


@pytest.mark.slow
def test_fastnas_through_prune_meets_the_budget_and_its_plan_is_fastnas_network(monkeypatch):
    """About 2 minutes on one CPU thread: ModelOpt's import, ~15 scored candidates, reruns from its checkpoint."""
    pytest.importorskip("modelopt")
    import autoprune.methods.fastnas as fastnas_method
    import autoprune.peers.fastnas as fastnas_peer
    from autoprune.train import train

    runs, scored = [], []
    original_run, original_accuracy = fastnas_method.run, fastnas_peer.accuracy
    monkeypatch.setattr(fastnas_method, "run", lambda *a, **kw: runs.append(original_run(*a, **kw)) or runs[-1])
    # its first limit 30% above the budget, so that ModelOpt's own rerun from the checkpoint with
    # an absolute limit (method fastnas's tightening) is exercised as well
    monkeypatch.setattr(fastnas_method, "percent", lambda fraction: fastnas_peer.percent(1.3 * fraction))
    monkeypatch.setattr(fastnas_peer, "accuracy",
                        lambda *a, **kw: scored.append(1) or original_accuracy(*a, **kw))
    data = ap.data.load("digits", image_size=8)
    torch.manual_seed(0)
    model = CifarResNet(8, num_classes=10)
    train(model, data, epochs=2, progress=False)
    model.eval()
    x = torch.zeros(1, *data.input_shape)
    base = fvcore_cost(model, x).flops

    result = ap.prune(model, data, "flops<=50%", method="fastnas", finetune_epochs=0, progress=False,
                      calib_images=64, bn_batches=3)
    report = result.report
    assert fvcore_cost(result.model, x).flops <= 0.5 * base  # the budget, by fvcore's own recount
    assert report["budget"]["realized"] == report["fastnas"]["realized"]["autoprune"] <= report["budget"]["target"]
    assert report["compute"]["proxy_evaluations"] == len(scored) == report["fastnas"]["score_calls"] > 0
    assert report["fastnas"]["wall_s"] > 0 and report["fastnas"]["channel_divisor"] == 8
    assert result.plan.keep, "FastNAS pruned nothing at flops<=50%"
    tried = report["fastnas"]["attempts"]
    assert tried[0]["limit"] == "65.0%" and tried[0]["realized"] > report["budget"]["target"] and len(tried) > 1
    for before, after in itertools.pairwise(tried):  # absolute limits in its own count, each below its last landing
        assert isinstance(after["limit"], float) and after["limit"] < before["modelopt"]
        assert after["modelopt"] <= after["limit"]

    # the Plan applied to the dense model is FastNAS's network: equal outputs once both re-estimate
    # their BN statistics on the same batches (FastNAS's copy holds its own re-estimated ones)
    fastnas_net, ours = runs[-1].model, result.plan.apply(model)
    for net in (fastnas_net, ours):
        adaptive_bn(net, data.train, n_batches=4, seed=5)
    images = torch.stack([data.test[i][0] for i in range(64)])
    with torch.no_grad():
        assert torch.allclose(ours(images), fastnas_net(images), atol=1e-4, rtol=1e-4)


def test_options_reach_fastnas_and_only_its_recorded_settings(monkeypatch, tmp_path, capsys):
    """fastnas_batches/fastnas_divisor (prune keywords, --fastnas-batches/--fastnas-divisor) go
    to ModelOpt's run and into the fastnas run's settings, so a changed value is not reused; no
    other method records them, so adding them reused every other finished run as it was."""
    from autoprune.cli import main
    from autoprune.prune import prune_settings

    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=4).eval()  # a checkpoint needs a named model
    data = ap.data.load("synthetic", image_size=8)
    space = ap.Space(model, torch.zeros(1, 3, 8, 8))
    _fake_runs(monkeypatch, space, offset=0.0)
    import autoprune.methods.fastnas as fastnas_method
    seen, fake = [], fastnas_method.run
    monkeypatch.setattr(fastnas_method, "run", lambda *a, **kw: seen.append((kw["batches"], kw["divisor"])) or
                        fake(*a, **kw))
    result = ap.prune(model, data, "flops<=50%", method="fastnas", finetune_epochs=0, progress=False,
                      calib_images=16, bn_batches=1, fastnas_batches=64, fastnas_divisor=4)
    assert seen[0] == (64, 4)
    assert result.report["fastnas"]["fastnas_batches"] == 64 and result.report["fastnas"]["channel_divisor"] == 4
    options = result.report["settings"]["options"]
    assert (options["fastnas_batches"], options["fastnas_divisor"]) == (64, 4)
    default = prune_settings(model, data, "flops<=50%", "fastnas")["options"]
    assert (default["fastnas_batches"], default["fastnas_divisor"]) == (50, 8)  # = methods.fastnas.DEFAULTS
    assert fastnas_method.DEFAULTS == {"fastnas_batches": 50, "fastnas_divisor": 8}
    for other in ("uniform", "greedy", "wsp", "tp_global", "selfgroup"):  # compare hands them to every arm
        recorded = prune_settings(model, data, "flops<=50%", other)
        assert not {"fastnas_batches", "fastnas_divisor"} & set(recorded["options"])
        assert prune_settings(model, data, "flops<=50%", other, fastnas_batches=64, fastnas_divisor=4) == recorded
    # on the command line: given values reach ModelOpt's run and the run's settings...
    from autoprune import checkpoint
    monkeypatch.chdir(tmp_path)
    checkpoint.save_baseline(tmp_path / "base.pt", model, data={"name": "synthetic", "image_size": 8},
                             input_shape=[3, 8, 8])
    seen.clear()
    assert main(["prune", "--checkpoint", "base.pt", "--method", "fastnas", "--flops", "50%", "--epochs", "0",
                 "--calib-images", "16", "--fastnas-batches", "72", "--fastnas-divisor", "2", "--out", "cli",
                 "--no-progress"]) == 0
    recorded = json.loads((tmp_path / "cli" / "report.json").read_text())["settings"]["options"]
    assert seen[0] == (72, 2) and (recorded["fastnas_batches"], recorded["fastnas_divisor"]) == (72, 2)
    # ...and are checked before any baseline is trained or loaded, one line, exit 2
    capsys.readouterr()
    prune_cmd = ["prune", "--method", "fastnas", "--flops", "50%"]
    for cmd, flag, why in ((prune_cmd, "--fastnas-batches", "fastnas_batches"),
                           (["compare", "--methods", "uniform,fastnas", "--flops", "50%"], "--fastnas-batches",
                            "fastnas_batches"),
                           (prune_cmd, "--fastnas-divisor", "--fastnas-divisor")):
        value = "0" if flag == "--fastnas-divisor" else "49"
        code = main([*cmd, "--model", "resnet20", "--data", "digits", flag, value, "--out", "o"])
        err = capsys.readouterr().err
        assert code == 2 and why in err and err.count("\n") == 1 and not (tmp_path / "o").exists(), err
