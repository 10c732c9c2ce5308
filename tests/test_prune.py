"""End-to-end pruning: budgets met, reports that recount, greedy invariants, CLI errors."""

import json

import pytest
import torch

import autoprune as ap
from autoprune import checkpoint, cli
from autoprune.evaluate import accuracy
from autoprune.greedy import MaskedEvaluator, _State, greedy_widths
from autoprune.prune import prune


@pytest.mark.parametrize("method,budget", [("greedy", "flops<=50%"), ("uniform", "params<=60%"),
                                           ("wsp", "flops<=40%")])
def test_prune_report_recounts(trained, tmp_path, method, budget):
    model, data = trained
    quick = {"greedy_step": 0.1, "greedy_bn_batches": 1} if method == "greedy" else {}  # the authors' loop, coarse
    result = prune(model, data, budget, method=method, finetune_epochs=1, calib_images=128,
                   bn_batches=5, out=tmp_path, progress=False, **quick)
    report = json.loads((tmp_path / "report.json").read_text())
    b = ap.Budget.parse(budget)
    assert report["budget"]["realized"] <= report["budget"]["target"]
    ratio = report["budget"]["realized"] / report["budget"]["target"]
    if method == "uniform":
        assert report["budget"]["within_tolerance"], ratio
    elif method == "greedy":  # when the greedy has left only coarse units (residual-stream
        assert ratio >= 0.98, ratio  # channels, each worth > 0.5% of the FLOPs) it can land up
        # to ~1-2% under the target; measured within 0.5% on this model when run alone
    # WSP removes exactly its weak sub-network, which may land further under the target
    again = ap.load(tmp_path / "model.pt")
    x = torch.zeros(1, *data.input_shape)
    recount = ap.fvcore_cost(again, x)
    assert (report["pruned"]["flops"], report["pruned"]["params"]) == tuple(recount)
    assert getattr(recount, b.kind) == report["budget"]["realized"]
    assert accuracy(again, data.test) == pytest.approx(report["pruned"]["accuracy"])
    assert report["base"]["flops"] == ap.fvcore_cost(model, x).flops
    assert (tmp_path / "widths.png").stat().st_size > 1000
    plan = json.loads((tmp_path / "plan.json").read_text())
    kept = {u: v["kept"] for u, v in plan["units"].items()}
    assert all(report["widths"][u][0] == k for u, k in kept.items())
    assert report["method"] == method and result.plan.kept_widths() == kept


def test_greedy_trajectory_monotone_and_lands(trained):
    model, data = trained
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    scores = ap.criteria.score("l1", space)
    result = greedy_widths(space, scores, "flops<=40%", progress=False)
    flops = [t["flops"] for t in result.trajectory]
    assert all(a > b for a, b in zip(flops, flops[1:]))
    target = ap.Budget.parse("flops<=40%").target(space)
    assert target * 0.995 <= space.cost(result.widths).flops <= target
    assert target * 0.995 <= flops[-1] <= target  # the last step lands on the budget


def test_greedy_accuracy_mode_commits_best_physical_candidate(trained):
    model, data = trained
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    scores = ap.criteria.score("l1", space)
    val = list(ap.data.loader(data.val, batch_size=256))
    evaluator = MaskedEvaluator(model, space, val)
    result = greedy_widths(space, scores, "flops<=94%", step=0.02, mode="accuracy",
                           evaluator=evaluator, progress=False)
    assert len(result.trajectory) >= 2
    for step in result.trajectory:  # every committed step is the best of its candidates
        assert step["candidates"][step["unit"]] == max(step["candidates"].values()) == step["accuracy"]
    first = result.trajectory[0]
    # recompute each first-step candidate by physically pruning it
    physical = {}
    for unit, proxy in first["candidates"].items():
        widths = space.full_widths()
        widths.update(_State(space, scores, "flops").candidate(space.unit(unit), 0.02 * space.cost().flops))
        small = ap.select(space, widths, scores=scores).apply(model).eval()
        physical[unit] = accuracy(small, data.val)
        assert physical[unit] == pytest.approx(proxy)  # masks == physical removal
    assert physical[first["unit"]] == max(physical.values())


class _Recording(MaskedEvaluator):
    """A MaskedEvaluator that keeps the masks of every candidate it scored, by their widths."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = {}

    def _see(self, masks):
        widths = {**self.space.full_widths(), **{k: int(m.sum()) for k, m in masks.items()}}
        self.seen[tuple(sorted(widths.items()))] = {k: m.clone() for k, m in masks.items()}

    def __call__(self, masks, batches=None):
        self._see(masks)
        return super().__call__(masks, batches)

    def many(self, base, candidates, batches=None):
        for _, masks in candidates:
            self._see(masks)
        return super().many(base, candidates, batches)


@pytest.mark.parametrize("case", ["tied", "clusters", "rescored"])
def test_greedy_steps_evaluate_the_network_select_produces(trained, case):
    """Every committed accuracy-mode step masked exactly the channels ``select`` keeps at
    that step's widths: the masked model's outputs equal the physically pruned model's.
    Tied scores (select keeps the lower indices) and cluster-proportional selection are the
    two ways a score-order mask used to differ from the Plan. Re-scored by DI on the pruned
    network every step, the ranking changes as the walk goes: each step's channels are
    those it committed to (removed channels stay removed), and the final ranking's Plan
    removes exactly the last step's channels."""
    from autoprune import grouping
    from autoprune.calibrate import calibrate
    from autoprune.greedy import channel_masks
    from autoprune.greedy_rescore import Rescorer
    from autoprune.plan import Plan
    model, data = trained
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    labels, rescoring = None, {}
    if case == "tied":
        scores = {u.name: torch.ones(u.width) for u in space.units}
    elif case == "clusters":
        scores, labels = ap.criteria.score("l1", space), grouping.cluster("sg", space, None, 4)
    else:
        calib = list(ap.data.loader(data.train, batch_size=64, shuffle=True, seed=0))[:1]
        stats = calibrate(space, model, calib, [("di", {"num_classes": 10})], n_images=64, progress=False)
        scores = ap.criteria.score("di", space, stats, num_classes=10)
    val = list(ap.data.loader(data.val, batch_size=256))[:1]
    evaluator = _Recording(model, space, val)
    if case == "rescored":
        rescoring = {"rescorer": Rescorer(space, evaluator.model, calib, {"di": 1.0}, {"di": {"num_classes": 10}}, 64),
                     "rescore_every": 1}
    result = greedy_widths(space, scores, "flops<=70%", step=0.05, mode="accuracy", evaluator=evaluator,
                           progress=False, clusters=labels, **rescoring)
    assert len(result.trajectory) >= 3 and result.info["mode"] == "accuracy"
    x = val[0][0]
    widths, previous = space.full_widths(), {}
    for step in result.trajectory:
        assert step["mode"] == "accuracy"
        widths[step["unit"]] = step["kept"]
        masks = evaluator.seen[tuple(sorted(widths.items()))]
        with torch.no_grad(), channel_masks(model, space, masks):
            masked = model(x)
        if case == "rescored":  # the step's own channels, physically; nested in the previous step's
            keep = {u: torch.nonzero(m).flatten().tolist() for u, m in masks.items()}
            plan = Plan(keep, {u: len(m) for u, m in masks.items()}, space.input_shape)
            assert all(set(keep[u]) <= set(previous.get(u, keep[u])) for u in keep)
            previous = keep
        else:
            plan = ap.select(space, widths, scores=scores, clusters=labels)
        small = plan.apply(model).eval()
        with torch.no_grad():
            physical = small(x)
        assert torch.allclose(masked, physical, atol=1e-5), (step["step"], step["unit"])
    if case == "rescored":
        assert result.info["rescores"] == len(result.trajectory) - 1
        final = ap.select(space, widths, scores=result.scores).keep
        assert final == previous
        assert ap.select(space, widths, scores=scores).keep != final  # re-ranking changed the channels


def test_greedy_criterion_mode_compares_units_on_one_scale(trained):
    """Criterion mode commits the least score lost per FLOP saved, on one scale for all units:
    a unit whose scores are 1000x larger keeps more channels; scaling every unit changes nothing."""
    model, data = trained
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    scores = {k: v.double() for k, v in ap.criteria.score("l1", space).items()}

    def run(s):
        return greedy_widths(space, s, "flops<=60%", step=0.02, progress=False)

    base = run(scores)
    assert base.info["mode"] == "criterion" and all(t["mode"] == "criterion" for t in base.trajectory)
    assert run({k: v * 1000 for k, v in scores.items()}).widths == base.widths
    name = min(space.units, key=lambda u: base.widths[u.name] / u.width).name  # the most-cut unit
    scaled = run({**scores, name: scores[name] * 1000}).widths
    assert scaled[name] > base.widths[name]


def test_prune_gives_the_greedy_the_plans_clusters(trained, monkeypatch):
    """With ``clusters=``, the greedy gets the very labels the Plan is selected with."""
    from autoprune import grouping
    from autoprune.methods import greedy as greedy_method
    seen = {}

    def recording(space, scores, budget, **kwargs):
        seen.update(kwargs, space=space, scores=scores)
        return greedy_widths(space, scores, budget, **kwargs)

    monkeypatch.setattr(greedy_method, "greedy_widths", recording)
    model, data = trained
    result = prune(model, data, "flops<=70%", method="greedy", clusters="sg", greedy_step=0.05,
                   finetune_epochs=0, calib_images=64, bn_batches=2, greedy_bn_batches=0, progress=False,
                   greedy_mode="criterion", greedy_rescore=0)
    space = seen["space"]
    expected = grouping.cluster("sg", space, None, None)
    assert seen["clusters"].keys() == expected.keys()
    assert all((seen["clusters"][k] == v).all() for k, v in expected.items())
    plan = ap.select(space, result.plan.kept_widths(), scores=seen["scores"], clusters=seen["clusters"])
    assert plan.keep == result.plan.keep
    assert result.report["greedy"]["mode"] == "criterion"
    assert all(t["mode"] == "criterion" for t in result.report["trajectory"])


def test_adaptive_bn_candidates_leave_the_model_untouched(trained):
    """Accuracy mode with adaptive BN scores a candidate as physical pruning + adaptive BN
    would, and the caller's BN statistics are unchanged afterwards."""
    from autoprune.evaluate import adaptive_bn
    model, data = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    scores = ap.criteria.score("l1", space)
    val = list(ap.data.loader(data.val, batch_size=256))
    train = list(ap.data.loader(data.train, batch_size=64, shuffle=True, seed=0))[:3]
    evaluator = MaskedEvaluator(model, space, val, train, bn_fn=lambda m, b: adaptive_bn(m, b))
    state = _State(space, scores, "flops")
    unit = space.units[3]
    widths = state.candidate(unit, 0.05 * space.cost().flops)
    masked = evaluator(state.masks(widths))
    small = adaptive_bn(ap.select(space, widths, scores=scores).apply(model), train)
    assert masked == pytest.approx(accuracy(small, data.val))
    assert evaluator(state.masks(widths)) == masked  # statistics restored between candidates
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_prune_greedy_trajectory_records_accuracy(trained):
    model, data = trained
    result = prune(model, data, "flops<=80%", method="greedy", greedy_step=0.05, finetune_epochs=0,
                   calib_images=64, bn_batches=3, greedy_bn_batches=2, progress=False)
    steps = result.report["trajectory"]
    assert len(steps) >= 3 and all(0.0 <= s["accuracy"] <= 1.0 for s in steps)
    flops = [s["flops"] for s in steps]
    assert all(a > b for a, b in zip(flops, flops[1:]))


def _run(args, capsys):
    """Exit code and stderr, which must be exactly one line when the command fails."""
    code = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    if code != 0:
        assert len(err) == 1, err
    return code, err[-1] if err else ""


@pytest.fixture(scope="module")
def base_ckpt(trained_once, tmp_path_factory):
    model, data = trained_once  # saved, never changed
    path = tmp_path_factory.mktemp("ck") / "base.pt"
    checkpoint.save_baseline(path, model, data=data.settings | {"name": "digits"},
                             input_shape=list(data.input_shape))
    return path


def test_cli_prune_with_checkpoint(base_ckpt, tmp_path, capsys):
    code = cli.main(["prune", "--checkpoint", str(base_ckpt), "--flops", "50%", "--epochs", "0",
                     "--calib-images", "64", "--out", str(tmp_path / "o"), "--no-progress",
                     "--greedy-step", "0.1", "--greedy-bn-batches", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "realized" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["budget"]["realized_ratio"] <= 0.5


@pytest.mark.parametrize("extra,needle", [
    (["--flops", "0.01%"], "smallest reachable"),
    (["--flops", "50%", "--method", "magic"], "unknown method"),
    (["--flops", "50%", "--criterion", "dii"], "unknown criterion"),
    (["--flops", "50%", "--params", "50%"], "exactly one budget"),
    (["--flops", "half"], "malformed"),
    (["--flops", "50%", "--greedy-mode", "bogus"], "unknown greedy mode"),
    (["--flops", "50%", "--clusters", "kmeans"], "unknown clusters"),
    (["--flops", "50%", "--model", "resnet56"], "holds resnet20"),
    (["--flops", "50%", "--method", "uniform", "--greedy-step", "0.1"],
     "--greedy-step is an option of method greedy, which this command does not run (methods: uniform)"),
    (["--flops", "50%", "--method", "search", "--fastnas-divisor", "8"], "--fastnas-divisor is an option of method fastnas"),
    (["--flops", "50%", "--method", "magic", "--greedy-step", "0.1"], "unknown method"),
])
def test_cli_prune_bad_input(base_ckpt, tmp_path, capsys, extra, needle):
    code, line = _run(["prune", "--checkpoint", str(base_ckpt), "--out", str(tmp_path / "o"),
                       "--no-progress", "--epochs", "0", *extra], capsys)
    assert code == 2 and needle in line and line.startswith("autoprune: error:")


def test_compare_refuses_a_method_option_no_listed_method_reads(base_ckpt, tmp_path, capsys):
    argv = ["compare", "--checkpoint", str(base_ckpt), "--flops", "50%", "--seeds", "0", "--epochs", "0",
            "--out", str(tmp_path / "o"), "--no-progress", "--greedy-step", "0.1"]
    code, line = _run([*argv, "--methods", "uniform,wsp"], capsys)
    assert code == 2 and "--greedy-step is an option of method greedy" in line and "uniform, wsp" in line
    assert not (tmp_path / "o" / "results.json").exists()
    code, line = _run([*argv, "--methods", "uniform,greedy", "--fastnas-batches", "60"], capsys)
    assert code == 2 and "--fastnas-batches is an option of method fastnas" in line


def test_cli_prune_bad_files(base_ckpt, tmp_path, capsys):
    out = ["--out", str(tmp_path / "o"), "--flops", "50%", "--no-progress"]
    code, line = _run(["prune", "--checkpoint", str(tmp_path / "none.pt"), *out], capsys)
    assert code == 2 and "does not exist" in line
    broken = tmp_path / "broken.pt"
    broken.write_bytes(base_ckpt.read_bytes()[:1000])
    code, line = _run(["prune", "--checkpoint", str(broken), *out], capsys)
    assert code == 2 and "unreadable" in line
    code, line = _run(["prune", "--checkpoint", str(base_ckpt), "--data", "synthetic", *out], capsys)
    assert code == 2 and "10 classes" in line and "4" in line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, line = _run(["prune", "--checkpoint", str(base_ckpt), "--flops", "50%",
                       "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot write to --out" in line


def test_cli_prune_checks_options_before_training(tmp_path, capsys, monkeypatch):
    """With --model/--data, bad options fail at once: no baseline is trained or cached."""
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    for extra, needle in ((["--flops", "50%", "--method", "magic"], "unknown method"),
                          (["--flops", "50%", "--criterion", "dii"], "unknown criterion"),
                          (["--flops", "150%"], "budget")):
        code, line = _run(["prune", "--model", "resnet20", "--data", "digits", "--out",
                           str(tmp_path / "o"), "--no-progress", *extra], capsys)
        assert code == 2 and needle in line, line
    assert not (tmp_path / "cache").exists()


def test_cli_prune_interrupted_is_one_line(base_ckpt, tmp_path, capsys, monkeypatch):
    import importlib
    prune_module = importlib.import_module("autoprune.prune")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(prune_module, "prune", interrupted)
    code = cli.main(["prune", "--checkpoint", str(base_ckpt), "--flops", "50%", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and err == ["autoprune: interrupted"]
    assert not (tmp_path / "o" / "report.json").exists()


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint.atomic_save({"state_dict": {"w": torch.ones(2)}}, path)
    before = path.read_bytes()

    class Boom:
        def __reduce__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"state_dict": {}, "x": Boom()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


@pytest.mark.slow
def test_main_command_trains_caches_and_reuses_the_baseline(tmp_path, capsys, monkeypatch):
    """The README's main command without --checkpoint: the baseline is trained once, cached,
    reused by the next run; the pruned model recounts to the report."""
    monkeypatch.setenv("AUTOPRUNE_CACHE", str(tmp_path / "cache"))
    argv = ["prune", "--model", "resnet20", "--data", "digits", "--image-size", "8", "--flops", "50%",
            "--baseline-epochs", "1", "--epochs", "1", "--calib-images", "64", "--no-progress"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    (cached,) = (tmp_path / "cache").iterdir()
    stamp = cached.stat().st_mtime_ns
    # the next run (a cheaper method: the cache, not the method, is what is checked) reuses it
    assert cli.main([*argv, "--method", "uniform", "--out", str(tmp_path / "b")]) == 0
    assert cached.stat().st_mtime_ns == stamp and len(list((tmp_path / "cache").iterdir())) == 1
    out = capsys.readouterr().out
    assert "realized" in out and "accuracy" in out
    a, b = (json.loads((tmp_path / d / "report.json").read_text()) for d in "ab")
    assert a["base"]["accuracy"] == b["base"]["accuracy"]  # the same cached baseline
    small = ap.load(tmp_path / "a" / "model.pt")
    recount = ap.fvcore_cost(small, torch.zeros(1, 3, 8, 8))
    assert recount.flops == a["pruned"]["flops"] <= a["budget"]["target"]


def test_atomic_writes_get_ordinary_permissions(tmp_path):
    import os
    path = tmp_path / "report.json"
    checkpoint.write_json(path, {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert json.loads(path.read_text()) == {"a": 1}
