"""The search arms: random (EagleEye-style random search) and search_widths (widths only),
each the search run with one part changed."""

import json

import optuna
import pytest
import torch
import yaml

import autoprune as ap
from autoprune import methods, pipeline
from autoprune.errors import AutopruneError
from autoprune.prune import prune, prune_settings, search_run
from autoprune.search import load
from autoprune.search.runner import arm_space, space_digest
from autoprune.search.space_error import SearchSpaceError

TINY_SPACE = """\
ratios: [{match: '.*', low: 0.0, high: 0.8, tie: stage}]
criteria: [l1, di]
clusters: {method: sg, k: [2, 4], tie: stage}
proxy: {bn_batches: 2, finetune_steps: 5, eval_batches: 1, lr: 0.01}
sampler: {name: tpe, n_startup_trials: 1}
"""


def test_arms_are_the_search_with_one_part_changed():
    assert search_run("search") == {} and search_run("uniform") is None
    assert search_run("random") == {"sampler": "random", "seed_trials": False}
    assert search_run("search_widths") == {"criterion": "di"}
    spec = load("resnet_cifar")
    rand = arm_space(spec, sampler="random")
    assert dict(rand.sampler) == {"name": "random"}
    assert (rand.ratios, rand.criteria, rand.clusters, rand.proxy) == \
        (spec.ratios, spec.criteria, spec.clusters, spec.proxy)
    widths = arm_space(spec, criterion="di")
    assert widths.criteria == ["di"] and widths.clusters is None and widths.selfgroup is None
    assert (widths.ratios, widths.sampler, widths.proxy) == (spec.ratios, spec.sampler, spec.proxy)
    assert arm_space(spec) is spec
    with pytest.raises(SearchSpaceError, match="nope"):  # the derived space is validated like a file
        arm_space(spec, criterion="nope")
    with pytest.raises(SearchSpaceError, match="sampler"):
        arm_space(spec, sampler="annealing")


def test_space_digest_is_the_same_however_the_space_is_written(tmp_path):
    """The digest compare keys reuse by: a space, and the same space as written into a search's
    space.yaml and loaded back, agree; another sampler differs."""
    spec = arm_space(load("vgg_cifar"), sampler="random")
    data = {k: v for k, v in spec.as_dict().items() if k not in ("name", "path") and v is not None}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    again = load(tmp_path / "space.yaml")
    assert space_digest(again) == space_digest(spec) != space_digest(load("vgg_cifar"))


def test_arms_refuse_to_run_as_width_methods():
    for name in ("random", "search_widths"):
        with pytest.raises(AutopruneError, match=f"--methods {name}"):
            pipeline.check_options(name)
        with pytest.raises(AutopruneError, match="search run"):
            methods.get(name).widths(None, ap.Budget.parse("flops<=50%"), None)


@pytest.mark.slow
def test_random_arm_draws_from_the_space_without_seeds_and_meets_the_budget(trained, tmp_path):
    model, data = trained
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    trials = 5
    kw = dict(space=tmp_path / "tiny.yaml", trials=trials, workers=1, finetune_epochs=1, calib_images=64,
              bn_batches=3, progress=False)
    result = prune(model, data, "flops<=40%", method="random", out=tmp_path / "run", **kw)
    report = result.report
    assert report["method"] == "random" and report["seeds"] == {}
    assert not any(t.get("seed_of") for t in report["trials"])
    assert report["search"]["space"]["sampler"] == {"name": "random"}

    spec = arm_space(load(tmp_path / "tiny.yaml"), sampler="random")
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    variables = spec.variables(space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))  # the draws, recomputed
    define, drawn = spec.define(space), []
    for _ in range(trials):
        trial = study.ask()
        define(trial)
        drawn.append(trial.params)
    rows = sorted(report["trials"], key=lambda t: t["number"])
    assert [r["config"] for r in rows] == drawn  # every trial is the random sampler's, in order
    for r in rows:
        assert set(r["config"]) == set(variables)
        for name, value in r["config"].items():  # within the space's domains
            assert (0.0 <= value <= 0.8) if name.startswith("ratio/") else \
                (value in (2, 4) if name.startswith("k/") else 0.05 <= value <= 1.0)

    base = ap.fvcore_cost(model, torch.zeros(1, *data.input_shape)).flops
    assert report["pruned"]["flops"] <= 0.4 * base and report["budget"]["realized"] <= report["budget"]["target"]
    assert report["compute"]["proxy_evaluations"] == trials and report["compute"]["finetunes"] == 1
    assert report["settings"] == json.loads(json.dumps(
        prune_settings(model, data, "flops<=40%", "random", **kw)))  # what compare reuses it by
    assert json.loads((tmp_path / "run" / "report.json").read_text())["settings"] == report["settings"]
