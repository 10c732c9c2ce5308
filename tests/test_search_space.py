"""Search spaces: packaged YAML files, tie rules, define-by-run sampling through real
Optuna studies (every candidate fits the budget), the inverse projection, validation
errors and seeded samplers."""

import importlib.util
import math
import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import autoprune as ap
from autoprune.budget import Budget
from autoprune.errors import AutopruneError, CriterionError
from autoprune.search import Candidate, SearchSpace, SearchSpaceError, load
from autoprune.search.space import WEIGHT_LOW, packaged, stage_of

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

STAGES = ["conv1", "layer1", "layer2", "layer3"]


@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=10)
    return ap.Space(model, torch.zeros(1, 3, 32, 32))


def custom(**overrides) -> SearchSpace:
    data = {"ratios": [{"match": ".*", "low": 0.0, "high": 0.8, "tie": "unit"}], "criteria": ["l1"]}
    data.update(overrides)
    return SearchSpace.from_dict(data, name="custom")


def write(tmp_path: Path, text: str, name: str = "myspace.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- packaged files

def test_packaged_spaces_load_with_their_settings():
    assert packaged() == ["generic", "resnet_cifar", "vgg_cifar"]
    r = load("resnet_cifar")
    assert (r.name, r.objective, r.sampler.name, r.criteria) == ("resnet_cifar", "accuracy", "tpe",
                                                                 ["di", "hrank", "l1"])
    assert [(x.match, x.low, x.high, x.tie) for x in r.ratios] == [(".*", 0.0, 0.8, "stage")]
    assert (r.clusters.method, r.clusters.k, r.clusters.tie) == ("sg", [2, 4, 8], "stage")
    assert r.selfgroup is None and r.asha is None and r.max_ratio == 0.9
    assert r.proxy == {"bn_batches": 20, "finetune_steps": 50, "eval_batches": 4, "lr": 0.01}
    assert r.proxy.lr == 0.01  # sections read as attributes too
    v = load("vgg_cifar.yaml")
    assert (v.ratios[0].high, v.ratios[0].tie, v.criteria) == (0.85, "unit", ["di", "hpse"])
    g = load("generic")
    assert (g.ratios[0].high, g.ratios[0].tie, g.criteria, g.clusters) == (0.7, "unit", ["l1", "di"], None)
    assert g.metrics() == (["proxy_score"], ["max"])
    # the same file by path and by the DESIGN's `search_spaces/NAME.yaml` spelling
    assert load(r.path).ratios == r.ratios and r.path.is_file()
    assert load("search_spaces/resnet_cifar.yaml").clusters == r.clusters
    assert pickle.loads(pickle.dumps(r)) == r


def test_stage_rule():
    assert stage_of("conv1") == "conv1"
    assert stage_of("layer2.0.conv1") == "layer2"
    assert stage_of("features.3") == "features.3"
    assert stage_of("features.2.0.block.0.0") == "features.2"
    assert stage_of("features.denseblock1.denselayer2.conv1") == "features.denseblock1"
    assert stage_of("stem.conv") == "stem.conv"


def test_stage_tie_on_resnet20_gives_stem_and_three_stages(space):
    s = load("resnet_cifar")
    variables = s.variables(space)
    assert list(variables) == ([f"ratio/{x}" for x in STAGES] + [f"k/{x}" for x in STAGES]
                               + ["w/di", "w/hrank", "w/l1"])
    assert variables["ratio/conv1"] == ["conv1"]
    for stage in STAGES[1:]:
        assert variables[f"ratio/{stage}"] == [u for u in space.unit_names if u.startswith(stage + ".")]
    covered = [u for x in STAGES for u in variables[f"ratio/{x}"]]
    assert sorted(covered) == sorted(space.unit_names)  # each unit in exactly one group


def test_other_ties_constants_unmatched_units_and_name_collisions(space):
    s = custom(ratios=[{"match": "^conv1$", "low": 0.0, "high": 0.0},          # constant
                       {"match": r"layer1\.0", "low": 0.1, "high": 0.3, "tie": "stage"},
                       {"match": "^layer1", "low": 0.2, "high": 0.6, "tie": "stage"},
                       {"match": "^layer2", "high": 0.5, "tie": "all"},
                       {"match": "^layer3", "high": 0.5, "tie": r"layer3\.(\d)"}])
    variables = s.variables(space)
    assert list(variables) == ["ratio/layer1", "ratio/layer1~2", "ratio/all",
                               "ratio/0", "ratio/1", "ratio/2"]
    assert variables["ratio/layer1"] == ["layer1.0.conv1"]
    assert variables["ratio/0"] == ["layer3.0.conv1", "layer3.0.conv2"]
    params = {name: 0.25 for name in variables}
    c = s.candidate(params, space)
    assert c.ratios["conv1"] == 0.0 and c.ratios["layer2.2.conv1"] == 0.25
    assert c.ratios["layer1.1.conv1"] == 0.25
    # a unit no rule matches keeps ratio 0
    c = custom(ratios=[{"match": "^layer3", "high": 0.5}]).candidate(
        {f"ratio/{u}": 0.4 for u in space.unit_names if u.startswith("layer3")}, space)
    assert c.ratios["layer2.0.conv1"] == 0.0 and c.ratios["layer3.1.conv1"] == 0.4
    # a tie regex must capture a key from every unit its rule covers
    bad = custom(ratios=[{"match": ".*", "high": 0.5, "tie": r"layer(\d)"}])
    with pytest.raises(SearchSpaceError, match=r"ratios\[0\]\.tie.*'conv1'"):
        bad.variables(space)


# ----------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("name", ["resnet_cifar", "generic"])
def test_every_sampled_candidate_is_in_range_and_meets_the_budget(space, name):
    s = load(name)
    budget = ap.Budget.parse("flops<=50%")
    target = budget.target(space)
    define, seen = s.define(space), []

    def objective(trial):
        define(trial)
        c = s.candidate(trial.params, space)
        assert isinstance(c, Candidate)
        rule = s.ratios[0]
        assert all(rule.low <= r <= rule.high for r in c.ratios.values())
        assert math.isclose(sum(c.mix.values()), 1.0) and set(c.mix) == set(s.criteria)
        if s.clusters:
            assert c.cluster_method == "sg" and set(c.cluster_k.values()) <= {2, 4, 8}
        widths = space.fit(c.ratios, budget)
        flops = space.cost(widths).flops
        assert flops <= target
        seen.append((trial.params, flops))
        return -flops / target

    study = optuna.create_study(direction="maximize", sampler=s.make_sampler(seed=1))
    study.optimize(objective, n_trials=20)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 20
    assert len(seen) == 20 and len({tuple(sorted(p.items())) for p, _ in seen}) == 20
    assert all(f >= target * 0.99 for _, f in seen)  # fitted close to the budget, not just under


def test_candidate_reads_ray_tunes_nested_config(space):
    from ray.tune.utils.util import unflatten_dict
    s = load("resnet_cifar")
    trial = optuna.create_study(sampler=s.make_sampler(0)).ask()
    s.define(space)(trial)
    assert s.candidate(unflatten_dict(trial.params), space) == s.candidate(trial.params, space)
    assert pickle.loads(pickle.dumps(s.define(space))).variables  # Ray pickles the searcher
    with pytest.raises(SearchSpaceError, match="lack variable 'ratio/layer2'"):
        s.candidate({k: v for k, v in trial.params.items() if k != "ratio/layer2"}, space)


def test_mix_weights_selfgroup_and_single_criterion(space):
    s = custom(criteria=["di", "l1", "hrank"], selfgroup={"k": [4, 8], "cp": [0.2, 0.6]})
    names = list(s.variables(space))
    assert names[-5:] == ["w/di", "w/l1", "w/hrank", "sg/k", "sg/cp"]
    params = {n: 0.3 for n in names if n.startswith("ratio/")}
    c = s.candidate({**params, "w/di": 0.6, "w/l1": 0.2, "w/hrank": 0.2, "sg/k": 8, "sg/cp": 0.5}, space)
    assert c.mix == pytest.approx({"di": 0.6, "l1": 0.2, "hrank": 0.2})
    assert c.selfgroup == {"k": 8, "cp": 0.5}
    one = custom(criteria=["l1"])
    assert not [n for n in one.variables(space) if n.startswith("w/")]
    assert one.candidate(params, space).mix == {"l1": 1.0}


@pytest.mark.parametrize("name", ["resnet_cifar", "generic", "vgg_cifar", "three"])
def test_sampled_mix_weights_are_strictly_positive(space, name):
    """Every weight a space can sample is > 0 (its distribution's low end is WEIGHT_LOW),
    so no sampled mix is all zero; criteria.mix itself refuses all-zero in one line."""
    s = custom(criteria=["di", "l1", "hrank"]) if name == "three" else load(name)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    weights = []
    for _ in range(30):
        trial = study.ask()
        s.define(space)(trial)
        dists = {n: d for n, d in trial.distributions.items() if n.startswith("w/")}
        assert len(dists) == (len(s.criteria) if len(s.criteria) > 1 else 0)
        assert all(d.low == WEIGHT_LOW > 0 and d.high == 1.0 for d in dists.values())
        weights += [trial.params[n] for n in dists]
        mix = s.candidate(trial.params, space).mix
        assert sum(mix.values()) == pytest.approx(1.0) and min(mix.values()) > 0
        study.tell(trial, 0.0)
    assert all(w >= WEIGHT_LOW for w in weights)
    lowest = s.candidate({**trial.params, **{n: WEIGHT_LOW for n in dists}}, space).mix
    assert all(w > 0 for w in lowest.values())  # the least a sampler can give still mixes
    with pytest.raises(CriterionError) as info:
        ap.criteria.mix({"di": 0.0, "l1": 0.0}, {"di": {"u": torch.ones(2)}, "l1": {"u": torch.ones(2)}})
    assert "\n" not in str(info.value) and "every weight is 0" in str(info.value)


def test_all_zero_user_mix_is_refused_before_any_work():
    """prune() refuses criterion={"di": 0, "hpse": 0} before it touches model or data."""
    with pytest.raises(CriterionError, match="every weight is 0") as info:
        ap.prune(None, None, "flops<=50%", method="uniform", criterion={"di": 0, "hpse": 0})
    assert "\n" not in str(info.value)


def test_accuracy_flops_objective_searches_the_budget_fraction(space):
    s = custom(objective="accuracy_flops", sampler={"name": "nsga2", "population_size": 4},
               budget_scale=[0.5, 1.0])
    assert s.metrics() == (["proxy_score", "flops"], ["max", "min"])
    names, modes = s.metrics()
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in modes],
                                sampler=s.make_sampler(0))
    trial = study.ask()
    s.define(space)(trial)
    c = s.candidate(trial.params, space)
    assert 0.5 <= c.budget_scale <= 1.0 and "budget/scale" in trial.params
    scaled = c.budget(Budget.parse("flops<=60%"))
    assert scaled.value == pytest.approx(0.6 * c.budget_scale)
    assert space.cost(space.fit(c.ratios, scaled)).flops <= scaled.target(space)
    assert load("resnet_cifar").define(space) and Candidate({}, None, None, {}, None).budget_scale == 1.0


# ----------------------------------------------------------------------------- inverse projection

def test_params_for_round_trips_tied_means(space):
    s = load("resnet_cifar")
    rng = np.random.default_rng(0)
    ratios = {u: float(rng.uniform(0.0, 0.7)) for u in space.unit_names}
    params = s.params_for(ratios, space)
    assert set(params) == set(s.variables(space))
    assert params["k/layer2"] == 2 and params["w/di"] == params["w/l1"]  # documented defaults
    c = s.candidate(params, space)
    for name, units in s.variables(space).items():
        if name.startswith("ratio/"):
            mean = float(np.mean([ratios[u] for u in units]))
            assert all(c.ratios[u] == pytest.approx(mean) for u in units)
    assert c.mix == pytest.approx({"di": 1 / 3, "hrank": 1 / 3, "l1": 1 / 3})
    # out-of-range ratios are clipped into [low, high]
    assert set(s.params_for({u: 0.89 for u in space.unit_names}, space).values()) >= {0.8}
    # an enqueued seed comes back unchanged as the study's first trial
    study = optuna.create_study(sampler=s.make_sampler(0))
    study.enqueue_trial(params)
    trial = study.ask()
    s.define(space)(trial)
    assert trial.params == params
    with pytest.raises(AutopruneError, match="no prunable unit"):
        s.params_for({"layer9.conv": 0.1}, space)


def test_params_for_selfgroup_defaults(space):
    s = custom(criteria=["di", "l1"], selfgroup={"k": [8, 16], "cp": [0.2, 0.6]})
    params = s.params_for({}, space)
    assert params["sg/k"] == 8 and params["sg/cp"] == pytest.approx(0.4)
    assert params["ratio/conv1"] == 0.0


# ----------------------------------------------------------------------------- validation

GOOD = """ratios:
  - {match: '.*', low: 0.0, high: 0.8, tie: stage}
criteria: [di, l1]
"""


@pytest.mark.parametrize("text, key, allowed", [
    (GOOD + "clusers: {method: sg, k: [2]}\n", "clusers", "did you mean 'clusters'?"),
    (GOOD + "sampler: {name: tpee}\n", "sampler.name", "tpe, nsga2, cmaes, gp, random"),
    (GOOD.replace("low: 0.0", "low: 0.9").replace("high: 0.8", "high: 0.5"), "ratios[0].low",
     "must not exceed high (0.5)"),
    (GOOD.replace("high: 0.8", "high: 1.5"), "ratios[0].high", "must be a number in [0, 1), got 1.5"),
    (GOOD.replace("high: 0.8", "high: x"), "ratios[0].high", "must be a number in [0, 1), got 'x'"),
    (GOOD.replace("[di, l1]", "[di, hrnk]"), "criteria[1]", "unknown criterion; did you mean 'hrank'?"),
    (GOOD + "clusters: {method: kmeans, k: [2]}\n", "clusters.method", "hpse, fchp, sg"),
    (GOOD + "objective: accuracy_flops\nsampler: cmaes\n", "sampler.name",
     "cannot optimise two objectives"),
    (GOOD + "objective: acc\n", "objective", "accuracy, accuracy_flops"),
    (GOOD.replace("tie: stage", "tie: stag"), "ratios[0].tie", "did you mean 'stage'?"),
    (GOOD.replace("tie: stage", "hihg: 0.5"), "ratios[0].hihg", "did you mean 'high'?"),
    (GOOD + "sampler: {name: tpe, n_startup: 3}\n", "sampler.n_startup", "n_startup_trials"),
    (GOOD + "sampler: {name: tpe, seed: 3}\n", "sampler.seed", "comes from the run"),
    (GOOD + "clusters: {method: hpse, k: [2, 4]}\n", "clusters.k", "give one choice"),
    (GOOD + "selfgroup: {k: [4], cp: [0.7, 0.2]}\n", "selfgroup.cp", "low 0.7 exceeds high 0.2"),
    (GOOD + "proxy: {eval_batches: 0}\n", "proxy.eval_batches", "integer >= 1"),
    (GOOD + "max_ratio: 0.7\n", "ratios[0].high", "at most max_ratio (0.7)"),
    ("criteria: [di]\n", "ratios", "is required"),
])
def test_validation_errors_name_file_key_and_what_is_allowed(tmp_path, text, key, allowed):
    path = write(tmp_path, text)
    with pytest.raises(SearchSpaceError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert allowed in message, message
    assert isinstance(err.value, AutopruneError)


def test_multiobjective_cmaes_error_lists_valid_samplers_and_good_file_loads(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"use one of tpe, nsga2, random"):
        load(write(tmp_path, GOOD + "objective: accuracy_flops\nsampler: {name: cmaes}\n"))
    assert load(write(tmp_path, GOOD + "objective: accuracy_flops\n")).budget_scale == (0.5, 1.0)
    assert load(write(tmp_path, GOOD, "fine.yaml")).name == "fine"


def test_file_level_errors(tmp_path):
    with pytest.raises(SearchSpaceError, match=r"no such file.*packaged search space.*did you mean 'generic'"):
        load("generc")
    with pytest.raises(SearchSpaceError, match=r"myspace\.yaml: line 2.*not valid YAML.*escape"):
        load(write(tmp_path, 'ratios:\n  - {match: "layer\\d", high: 0.5}\ncriteria: [l1]\n'))
    with pytest.raises(SearchSpaceError, match="the file is empty"):
        load(write(tmp_path, "# nothing\n"))


# ----------------------------------------------------------------------------- samplers

SAMPLER_NAMES = ["tpe", "nsga2", "gp", "random"] + (
    ["cmaes"] if importlib.util.find_spec("cmaes") else [])


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_seeded_sampler_repeats_its_first_suggestions(space, sampler):
    s = custom(ratios=[{"match": ".*", "high": 0.8, "tie": "stage"}], criteria=["di", "l1"],
               sampler={"name": sampler})

    def first(seed):
        study = optuna.create_study(sampler=s.make_sampler(seed))
        define, out = s.define(space), []
        for _ in range(5):
            trial = study.ask()
            define(trial)
            out.append(trial.params)
            study.tell(trial, sum(trial.params.values()))
        return out

    a = first(3)
    assert a == first(3)
    assert a != first(4)
    assert len(a[0]) == 6  # 4 stage ratios + 2 weights


def test_cmaes_is_refused_clearly_when_its_package_is_missing(tmp_path, monkeypatch):
    # cmaes is a dependency, so the machine has it: hide it from the lookup the check makes
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else real(name, *a))
    with pytest.raises(SearchSpaceError, match=r"sampler\.name: cmaes needs the 'cmaes' package"):
        load(write(tmp_path, GOOD + "sampler: cmaes\n"))
