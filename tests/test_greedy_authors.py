"""The DI greedy as its authors run it (issue 12): re-scoring on the pruned network, the 90%
cap, accuracy selection by default, DI lost per FLOP in the cheap mode, masked fine-tuning,
compute accounting. Constructed models and data, answers recomputed independently."""

import inspect

import numpy as np
import pytest
import torch
from torch import nn

import autoprune as ap
from autoprune import methods
from autoprune.calibrate import calibrate
from autoprune.criteria.base import Stats
from autoprune.criteria.di import summarise
from autoprune.errors import AutopruneError
from autoprune.greedy import floor_width, greedy_widths
from autoprune.greedy_masks import MaskedEvaluator, channel_masks
from autoprune.greedy_rescore import DIScatter, Rescorer, di_scatter
from autoprune.plan import kept_channels

RHO_REL = 1e-3


def numpy_di(x: np.ndarray, y: np.ndarray, rho: float) -> float:
    """tr[(S̄ + ρI)⁻¹ S_B] straight from the definition (float64)."""
    x = np.asarray(x, dtype=float)
    mu = x.mean(0)
    total = (x - mu).T @ (x - mu)
    between = sum((y == c).sum() * np.outer(x[y == c].mean(0) - mu, x[y == c].mean(0) - mu) for c in np.unique(y))
    return float(np.trace(np.linalg.solve(total + rho * np.eye(x.shape[1]), between)))


def numpy_rho(x: np.ndarray) -> float:
    """The scale-free default ridge, rel · tr(S̄)/D, of the features ``x``."""
    return RHO_REL * float(((x - x.mean(0)) ** 2).sum()) / x.shape[1]


# --------------------------------------------------------------------------- re-scoring


class Two(nn.Module):
    """Two 1x1 units: ``a`` (4 → 4) then ``b`` (4 → 4), identity norms, a classifier."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        x = torch.relu(self.bn_b(self.b(x)))
        return self.fc(x.mean((2, 3)))


def _two():
    """Inputs: x0, x1, x3 carry the class (3 classes), x2 is loud noise. ``a`` passes them on
    (a1 = the noise: A's cheapest channel). ``b``: b0 = a3, b1 = a2 + a1 (signal + noise),
    b2 = a1 (the noise alone, which denoises b1: valuable while a1 exists), b3 = a3 + 0.1·a0
    (near-copy of b0: B's cheapest on the full network). Once a1 is removed, b2 is constant
    (worthless) and b1 clean, so B's DI ranking changes."""
    torch.manual_seed(0)
    model = Two().eval()
    with torch.no_grad():
        for bn in (model.bn_a, model.bn_b):
            bn.weight.fill_(1)
            bn.bias.zero_()
            bn.running_mean.zero_()
            bn.running_var.fill_(1 - bn.eps)
        model.a.weight.copy_(torch.eye(4)[[0, 2, 1, 3]].view(4, 4, 1, 1))
        model.a.bias.fill_(20.0)  # keeps the ReLU linear
        model.b.weight.copy_(torch.tensor([[0, 0, 0, 1.], [0, 1, 1, 0], [0, 1, 0, 0], [0.1, 0, 0, 1]]).view(4, 4, 1, 1))
        model.b.bias.zero_()
    g = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 3
    x = torch.randn(300, 4, 2, 2, generator=g)
    x[:, 0] += 2.0 * (y == 1).float().view(-1, 1, 1)
    x[:, 1] = 0.5 * x[:, 1] + (y == 2).float().view(-1, 1, 1)
    x[:, 2] *= 2
    x[:, 3] += (y == 0).float().view(-1, 1, 1)
    batches = [(x[i:i + 100], y[i:i + 100]) for i in range(0, 300, 100)]
    return model, batches, x, y


def _pre_features(model, x):
    """Global-average-pooled outputs of convs ``a`` and ``b`` (before their norms)."""
    out = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.mean((2, 3))))
             for n in ("a", "b")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return {n: v.double().numpy() for n, v in out.items()}


def _di_run(model, batches, space, rescore_every):
    stats = calibrate(space, model, batches, [("di", {"num_classes": 3})], n_images=300, progress=False)
    scores = ap.criteria.score("di", space, stats, num_classes=3)
    evaluator = MaskedEvaluator(model, space, batches)
    rescorer = Rescorer(space, evaluator.model, batches, {"di": 1.0}, {"di": {"num_classes": 3}}, 300)
    result = greedy_widths(space, scores, "flops<=60%", step=0.02, di=di_scatter(stats),
                           rescorer=rescorer if rescore_every else None, rescore_every=rescore_every,
                           progress=False)
    return scores, result


def test_rescoring_reranks_on_the_pruned_network_as_brute_force():
    """After A loses its noise channel, B's denoiser b2 is worthless: re-scoring removes it
    next (DI lost 0), the full-network ranking cannot; the re-scored step equals the argmin of
    DI lost / FLOPs saved recomputed on the physically pruned network."""
    model, batches, x, y = _two()
    space = ap.Space(model, torch.zeros(1, 4, 2, 2))
    scores, plain = _di_run(model, batches, space, 0)
    _, fresh = _di_run(model, batches, space, 1)
    assert int(torch.argmin(scores["b"])) == 3  # on the full network B would drop b3 first
    assert [(t["unit"], t["removed"]) for t in (plain.trajectory[0], fresh.trajectory[0])] == [("a", [1])] * 2
    assert (plain.trajectory[1]["unit"], plain.trajectory[1]["removed"]) != ("b", [2])
    assert fresh.trajectory[1]["scored_at"] == 1 and plain.trajectory[1]["scored_at"] == 0

    # brute force: physically remove a1, recompute every unit's cheapest cut on real features
    widths = {"a": 3, "b": 4}
    pruned = ap.select(space, widths, scores=scores).apply(model).eval()
    feats = _pre_features(pruned, x)
    keep = {"a": [0, 2, 3], "b": [0, 1, 2, 3]}  # original indices of the physical channels
    labels = y.numpy()
    now = space.cost(widths).flops
    best = None
    for name, f in feats.items():
        rho = numpy_rho(f)
        full = numpy_di(f, labels, rho)
        lost = [full - numpy_di(np.delete(f, c, axis=1), labels, rho) for c in range(f.shape[1])]
        c = int(np.argmin(lost))
        saved = now - space.cost({**widths, name: widths[name] - 1}).flops
        cand = (lost[c] / saved, name, keep[name][c])
        best = cand if best is None or cand < best else best
    step = fresh.trajectory[1]
    assert (step["unit"], step["removed"]) == (best[1], [best[2]]) == ("b", [2])
    assert step["lost_per_flop"] == pytest.approx(best[0], abs=1e-9)
    # the final ranking keeps exactly what the last step evaluated: the greedy's Plan
    plan = ap.select(space, fresh.widths, scores=fresh.scores)
    removed = {u: sorted(set(range(4)) - set(plan.keep.get(u, range(4)))) for u in ("a", "b")}
    expected = {u: sorted(c for t in fresh.trajectory if t["unit"] == u for c in t["removed"]) for u in ("a", "b")}
    assert fresh.widths == {"a": 4 - len(expected["a"]), "b": 4 - len(expected["b"])}  # no channel put back
    assert removed == expected and expected["b"] == [2]


def test_rerank_keeps_removed_channels_removed_and_ranks_the_kept():
    """A re-ranking keeps exactly the committed channels at the current width (also per
    cluster) and orders the kept ones by the new scores."""
    from autoprune.greedy import _State
    model, _, _, _ = _two()
    space = ap.Space(model, torch.zeros(1, 4, 2, 2))
    for labels in (None, {"b": np.array([0, 0, 1, 1])}):
        state = _State(space, {"a": torch.arange(4.0), "b": torch.tensor([4.0, 3, 2, 1])}, "flops", labels, cap=1.0)
        b = space.unit("b")
        state.widths["b"] = 2
        kept = state.kept(b, 2)
        state.rerank("b", np.array([5.0, -7.0]))  # the new ranking flips the kept pair
        assert state.kept(b, 2) == kept
        assert state.kept(b, 1) == [kept[0]]
        assert set(state.kept(b, 3)) > set(kept)


# --------------------------------------------------------------------------- DI lost per FLOP


class Chain(nn.Module):
    """Three 3x3 units of 20 channels at decreasing resolution (different FLOPs per channel)."""

    def __init__(self, width=20):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.b, self.bn_b = nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width)
        self.c, self.bn_c = nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 3)

    def forward(self, x):
        for conv, bn in ((self.a, self.bn_a), (self.b, self.bn_b), (self.c, self.bn_c)):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def _features(seed, n=240, width=20, signal=1.0):
    """Per-unit constructed features: channel j carries the class with strength s_j (random)
    plus correlated noise; ``signal`` scales every class offset."""
    g = np.random.default_rng(seed)
    y = np.arange(n) % 3
    means = g.normal(size=(3, width)) * g.uniform(0, 1.5, size=width)
    noise = g.normal(size=(n, width)) @ (np.eye(width) + 0.3 * g.normal(size=(width, width)))
    return signal * means[y] + noise, y


def _di_stats(feats, labels):
    """The ``di`` criterion's summaries (one writer per unit) of constructed features."""
    per_unit = {}
    for name, f in feats.items():
        s = summarise(f, labels, num_classes=3)
        per_unit[name] = {"counts": s["counts"], "class_sums": s["class_sums"][None], "second": s["second"][None]}
    return Stats({"di": per_unit}, {"n_images": len(labels), "criteria": {"di": {"num_classes": 3}}})


def _chain_space():
    torch.manual_seed(0)
    model = Chain().eval()
    return model, ap.Space(model, torch.zeros(1, 3, 16, 16))


def _criterion_run(space, feats, labels, budget="flops<=55%", cap=0.9):
    stats = _di_stats(feats, labels)
    scores = ap.criteria.score("di", space, stats, num_classes=3)
    return scores, greedy_widths(space, scores, budget, step=1e-4, di=di_scatter(stats), cap=cap, progress=False)


def _assert_brute_force(space, feats, labels, scores, result):
    """Every step committed argmin over units of (DI of the kept channels before − after) /
    FLOPs saved, recomputed from the raw features with the definition of DI."""
    widths = space.full_widths()
    for step in result.trajectory:
        now, best = space.cost(widths).flops, None
        for unit in space.units:
            if widths[unit.name] <= floor_width(unit, 0.9):
                continue
            kept = kept_channels(unit, scores[unit.name], widths[unit.name])
            after = kept_channels(unit, scores[unit.name], widths[unit.name] - 1)
            f = feats[unit.name]
            rho = numpy_rho(f[:, kept])
            lost = numpy_di(f[:, kept], labels, rho) - numpy_di(f[:, after], labels, rho)
            saved = now - space.cost({**widths, unit.name: widths[unit.name] - 1}).flops
            best = min(best or (np.inf, None), (lost / saved, unit.name))
        assert step["unit"] == best[1], step["step"]
        assert step["lost_per_flop"] == pytest.approx(best[0], rel=1e-6, abs=1e-12)
        widths[step["unit"]] = step["kept"]


def test_criterion_mode_commits_least_di_lost_per_flop_as_brute_force():
    """The cheap mode compares units by the DI they actually lose, on DI's one scale: making
    unit b's features separate the classes 4x more changes the widths, and either way every
    step equals the brute-force argmin; rescaling b's features (DI is scale-free) changes
    nothing."""
    _, space = _chain_space()
    labels = _features(0)[1]
    feats = {name: _features(i)[0] for i, name in enumerate("abc")}
    stronger = {**feats, "b": _features(1, signal=4.0)[0]}
    runs = {}
    for key, f in (("base", feats), ("stronger", stronger)):
        scores, runs[key] = _criterion_run(space, f, labels, "flops<=40%")
        assert runs[key].info["rule"].startswith("di_lost_per_flop") and len(runs[key].trajectory) > 10
        _assert_brute_force(space, f, labels, scores, runs[key])
    assert runs["stronger"].widths != runs["base"].widths
    _, scaled = _criterion_run(space, {**feats, "b": feats["b"] * 1000.0}, labels, "flops<=40%")
    assert scaled.widths == runs["base"].widths


# --------------------------------------------------------------------------- the cap


def test_cap_holds_unless_the_budget_cannot_otherwise_be_met():
    _, space = _chain_space()
    labels = _features(0)[1]
    feats = {name: _features(i)[0] for i, name in enumerate("abc")}
    feats["c"] = np.random.default_rng(9).normal(size=feats["c"].shape)  # c carries no class: cheap to cut
    floors = {u.name: floor_width(u, 0.9) for u in space.units}
    assert floors == {"a": 2, "b": 2, "c": 2}
    base = space.cost().flops
    reachable = space.cost(floors).flops / base  # the least the cap allows
    budget = f"flops<={100 * (reachable + 0.03):.2f}%"
    _, uncapped = _criterion_run(space, feats, labels, budget, cap=1.0)
    assert uncapped.widths["c"] < floors["c"]  # without the cap, c would be cut below 10%
    _, capped = _criterion_run(space, feats, labels, budget)
    assert all(capped.widths[u] >= floors[u] for u in floors) and capped.info["cap_lifted_at"] is None
    assert space.cost(capped.widths).flops <= ap.Budget.parse(budget).target(space)
    # a budget below what the cap allows: the cap is lifted, recorded, and the budget met
    tight = f"flops<={100 * (reachable - 0.01):.2f}%"
    _, lifted = _criterion_run(space, feats, labels, tight)
    at = lifted.info["cap_lifted_at"]
    assert isinstance(at, int) and space.cost(lifted.widths).flops <= ap.Budget.parse(tight).target(space)
    assert any(lifted.widths[u] < floors[u] for u in floors)
    assert all(t["cap_lifted"] == (t["step"] >= at) for t in lifted.trajectory)
    before = space.full_widths()
    for t in lifted.trajectory[:at - 1]:
        before[t["unit"]] = t["kept"]
    assert all(before[u] >= floors[u] for u in floors)


def test_floor_width_is_the_fewest_reachable_channels_within_the_cap():
    unit = ap.space.Unit("u", 64, 1, 8, 1, ("u",))  # widths in steps of 8
    assert [floor_width(unit, c) for c in (0.9, 0.5, 0.95, 1.0)] == [8, 32, 8, 8]
    assert [floor_width(ap.space.Unit("v", 16, 1, 1, 1, ("v",)), c) for c in (0.9, 1.0)] == [2, 1]  # ceil(1.6)


# --------------------------------------------------------------------------- defaults, options


def test_accuracy_mode_is_the_default_everywhere():
    from autoprune import cli, pipeline
    from autoprune.methods import greedy as greedy_method
    from autoprune.prune import prune
    params = inspect.signature(prune).parameters
    for key, value in greedy_method.DEFAULTS.items():  # prune's defaults are the method's
        assert params[key].default == value, key
    assert greedy_method.DEFAULTS["greedy_mode"] == "accuracy" and greedy_method.DEFAULTS["greedy_rescore"] == 1
    assert inspect.signature(pipeline.check_options).parameters["greedy_mode"].default == "accuracy"
    from autoprune.cli_args import greedy_options
    args = cli.build_parser().parse_args(["prune", "--flops", "50%", "--out", "x"])
    assert greedy_options(args) == {}  # unset on the command line: prune's defaults apply
    args = cli.build_parser().parse_args(["prune", "--flops", "50%", "--out", "x", "--greedy-mode", "criterion",
                                          "--greedy-rescore", "3", "--greedy-cap", "0.8"])
    assert greedy_options(args) == {"greedy_mode": "criterion", "greedy_rescore": 3, "greedy_cap": 0.8}


def test_prune_runs_the_authors_greedy_by_default(trained):
    """prune(method="greedy") with default options: accuracy mode, re-scored every step, the
    committed step the most accurate candidate, compute and settings recorded."""
    model, data = trained
    result = ap.prune(model, data, "flops<=85%", method="greedy", greedy_step=0.05, finetune_epochs=0,
                      calib_images=64, bn_batches=2, greedy_bn_batches=1, progress=False)
    info, steps = result.report["greedy"], result.report["trajectory"]
    assert info["mode"] == "accuracy" and info["rescore_every"] == 1 and info["cap"] == 0.9
    assert info["rescores"] == len(steps) - 1 and info["wall_s"] > 0
    for t in steps:
        assert {"mode", "rule", "rescore_every", "cap", "finetune_every", "finetune_steps"} <= set(t)
        assert t["candidates"][t["unit"]] == max(t["candidates"].values()) == t["accuracy"]
    # the default screen (every candidate on one batch, the best 4 on all) applies only where
    # the validation data holds more than one batch of 256
    screens = len(data.val) > 256
    assert info["screen"] == 4 and all(("screened" in t) == (screens and len(t.get("screened", ())) > 4)
                                       for t in steps)
    assert all(len(t["candidates"]) == 4 for t in steps if "screened" in t)
    assert result.report["compute"]["proxy_evaluations"] == sum(len(t["candidates"]) + len(t.get("screened", ()))
                                                                for t in steps)
    assert [t["scored_at"] for t in steps] == list(range(len(steps)))


def test_data_free_context_runs_the_criterion_mode_and_refuses_the_rest():
    """The search's seed structures: no model/data, so criterion mode without re-scoring;
    asking for accuracy or re-scoring there is an error naming the option."""
    _, space = _chain_space()
    feats = {name: _features(i)[0] for i, name in enumerate("abc")}
    scores = ap.criteria.score("di", space, _di_stats(feats, _features(0)[1]), num_classes=3)
    budget = ap.Budget.parse("flops<=60%")
    greedy = methods.get("greedy")
    result = greedy.widths(space, budget, methods.Context(None, None, space, budget, scores=scores, progress=False))
    assert result.info["greedy"]["mode"] == "criterion" and result.info["greedy"]["rescore_every"] == 0
    assert result.info["compute"] == {"proxy_evaluations": 0}
    for options, needle in (({"greedy_mode": "accuracy"}, "greedy_mode 'accuracy'"),
                            ({"greedy_rescore": 2}, "greedy_rescore")):
        with pytest.raises(AutopruneError, match=needle):
            greedy.widths(space, budget, methods.Context(None, None, space, budget, scores=scores,
                                                         options=options, progress=False))


@pytest.mark.parametrize("kw,needle", [({"greedy_cap": 0}, "greedy_cap"), ({"greedy_cap": 1.5}, "greedy_cap"),
                                       ({"greedy_rescore": -1}, "greedy_rescore"),
                                       ({"greedy_finetune_steps": 0}, "greedy_finetune_steps"),
                                       ({"greedy_mode": "fast"}, "unknown greedy mode")])
def test_greedy_options_are_checked_up_front(kw, needle):
    from autoprune import pipeline
    with pytest.raises(AutopruneError, match=needle):
        pipeline.check_options("greedy", **kw)


# --------------------------------------------------------------------------- fine-tuning


def test_masked_finetune_trains_only_the_kept_channels():
    """With the masks held, the loss sends no gradient to a masked channel: plain SGD leaves
    its filter and norm parameters exactly as they were and moves the kept ones."""
    model, batches, _, _ = _two()
    space = ap.Space(model, torch.zeros(1, 4, 2, 2))
    evaluator = MaskedEvaluator(model, space, batches)
    mask = torch.tensor([1.0, 0, 1, 1])

    def train(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m.train()
        for xb, yb in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(m(xb), yb).backward()
            opt.step()

    evaluator.finetune({"a": mask}, train)
    new = evaluator.model
    assert evaluator.finetuned and not new.training
    for p_old, p_new in ((model.a.weight, new.a.weight), (model.a.bias, new.a.bias),
                         (model.bn_a.weight, new.bn_a.weight), (model.bn_a.bias, new.bn_a.bias)):
        assert torch.equal(p_old[1], p_new[1])
    assert not torch.equal(model.bn_a.bias[[0, 2, 3]], new.bn_a.bias[[0, 2, 3]])
    x = batches[0][0]
    with torch.no_grad(), channel_masks(new, space, {"a": mask}):
        masked = new(x)
    small = ap.select(space, {"a": 3}, scores={"a": mask, "b": torch.ones(4)}).apply(new).eval()
    with torch.no_grad():
        assert torch.allclose(masked, small(x), atol=1e-5)


def test_prune_keeps_the_greedys_finetuned_weights(trained):
    """greedy_finetune_every: the pipeline prunes the greedy's fine-tuned working copy."""
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    budget = ap.Budget.parse("flops<=85%")
    stats = calibrate(space, model, [next(iter(ap.data.loader(data.train, batch_size=64)))],
                      [("di", {"num_classes": 10})], n_images=64, progress=False)
    scores = ap.criteria.score("di", space, stats, num_classes=10)
    context = methods.Context(model, data, space, budget, scores, stats, progress=False,
                              options={"greedy_step": 0.05, "greedy_bn_batches": 1, "greedy_rescore": 0,
                                       "greedy_finetune_every": 1, "greedy_finetune_steps": 2},
                              criterion={"di": 1.0})
    result = methods.get("greedy").widths(space, budget, context)
    info = result.info["greedy"]
    assert info["finetunes"] == len(result.trajectory) - 1 >= 1 and info["finetune_steps"] == 2
    assert result.model is not None and result.model is not model
    assert not torch.equal(result.model.fc.weight, model.fc.weight)
    assert all(t.get("finetuned") for t in result.trajectory[:-1])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the caller's model


def test_di_scatter_matches_the_definition():
    """DI of subsets and within-set ΔDI from the summaries equal the definition on raw features
    (ridge: the scale-free default of the set in question)."""
    f, y = _features(3)
    d = di_scatter(_di_stats({"u": f}, y))
    keep, after = [0, 3, 5, 7, 11], [0, 5, 11]
    rho = numpy_rho(f[:, keep])
    assert d.value("u", keep) == pytest.approx(numpy_di(f[:, keep], y, rho), rel=1e-9)
    assert d.lost("u", keep, after) == pytest.approx(numpy_di(f[:, keep], y, rho) - numpy_di(f[:, after], y, rho),
                                                     rel=1e-9)
    brute = [numpy_di(f[:, keep], y, rho) - numpy_di(np.delete(f[:, keep], i, axis=1), y, rho) for i in range(5)]
    np.testing.assert_allclose(d.drops("u", keep), brute, rtol=1e-6)
    assert isinstance(d, DIScatter)
