"""FPAR end to end (issue 12, defect 2): ``prune``, criterion mixes, the CLI and search spaces
compute its attention on the calibration images, and its settings are checked before any work.

Every expected score is computed a second way: :func:`autoprune.criteria.fpar.fpar_scores` (or
``calibrate`` + ``criteria.score``) on calibration images drawn here with a plain seeded loader.
"""

import json
import sys
from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset

import autoprune as ap
from autoprune import checkpoint, cli, criteria, pipeline
from autoprune.calibrate import calibrate
from autoprune.criteria.fpar import fpar_scores, native_gates
from autoprune.data import loader
from autoprune.errors import CriterionError
from autoprune.plan import select
from autoprune.prune import prune
from autoprune.search.runner import driver_state
from autoprune.search.space import load

PRUNE_MODULE = sys.modules["autoprune.prune"]  # the module (autoprune.prune is the function)
CALIB = 32  # calibration images: one batch, small so that probe training is quick
SPACE = """\
ratios:
  - {match: '.*', low: 0.0, high: 0.8, tie: stage}
criteria: [CRITERIA]
proxy: {bn_batches: 2, finetune_steps: 2, eval_batches: 1, lr: 0.01}
sampler: {name: random}
"""


def calibration_images(data, seed: int, n: int = CALIB) -> list:
    """The first ``n`` training images in the order ``seed`` shuffles them, batches of 64."""
    out, left = [], n
    for x, y in loader(data.train, batch_size=64, shuffle=True, seed=seed):
        out.append((x[:left], y[:left]))
        left -= len(x)
        if left <= 0:
            return out
    return out


def record_scores(monkeypatch) -> dict:
    """Per criterion, the scores the pipeline computed (filled when it scores)."""
    seen = {}
    real = pipeline.criterion_scores

    def recording(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.update(out)
        return out

    monkeypatch.setattr(pipeline, "criterion_scores", recording)
    return seen


def assert_scores_equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for unit, value in expected.items():
        torch.testing.assert_close(got[unit], value)


def x_of(data) -> torch.Tensor:
    return torch.zeros(1, *data.input_shape)


def test_prune_with_fpar_meets_the_budget_with_the_scores_fpar_scores_gives(trained, monkeypatch):
    model, data = trained
    space = ap.Space(model, x_of(data))
    assert native_gates(space) == {}  # a CIFAR ResNet has no SE gate: probes are trained
    batches = calibration_images(data, seed=3)
    stats = calibrate(space, model, batches, ["hrank"], n_images=CALIB, progress=False)
    expected = fpar_scores(space, model, batches, stats=stats, seed=3, steps=10)
    seen = record_scores(monkeypatch)
    result = prune(model, data, "flops<=50%", method="uniform", criterion="fpar", finetune_epochs=0,
                   calib_images=CALIB, bn_batches=2, seed=3, progress=False, device="cpu",
                   criterion_params={"fpar": {"steps": 10}})
    report = result.report
    assert report["criterion"] == {"fpar": 1.0} and result.plan.meta["criterion"] == {"fpar": 1.0}
    recount = ap.fvcore_cost(result.model, x_of(data))
    assert report["pruned"]["flops"] == recount.flops <= report["budget"]["target"]
    assert_scores_equal(seen["fpar"], expected)
    # the Plan keeps, per unit, the channels those scores rank highest
    assert result.plan.keep == select(space, result.plan.kept_widths(), scores=expected).keep
    # the trained probes separated channels: untrained, every gate is 0.5, A/max(A) is 1 and
    # the score is 1 + R/max(R)
    ranks = criteria.score("hrank", space, stats)
    assert any(not torch.allclose(expected[u], 1 + r / r.max()) for u, r in ranks.items() if r.max() > 0)


@pytest.mark.slow
def test_the_default_greedy_rescores_fpar_with_the_attention_computed_once(trained, monkeypatch):
    """The authors' greedy (the default: re-scoring every step) with criterion fpar: every
    re-scoring reuses the attention computed once (probe training is not repeated per step)."""
    from autoprune.criteria.fpar import FPAR
    model, data = trained
    calls = []
    real = FPAR.inputs

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FPAR, "inputs", counting)
    result = prune(model, data, "flops<=60%", criterion="fpar", finetune_epochs=0, calib_images=CALIB,
                   bn_batches=2, greedy_step=0.1, seed=3, progress=False, device="cpu",
                   criterion_params={"fpar": {"steps": 5}})
    steps = result.report["trajectory"]
    assert result.report["greedy"]["mode"] == "accuracy" and len(steps) >= 2
    assert len(calls) == 2  # once for the pipeline's scores, once for the greedy's re-scorings
    assert result.report["pruned"]["flops"] <= result.report["budget"]["target"]


def test_a_di_fpar_mix_with_fpar_settings(trained, monkeypatch):
    model, data = trained
    space = ap.Space(model, x_of(data))
    batches = calibration_images(data, seed=0)
    fpar = fpar_scores(space, model, batches, lam=0.5, steps=5, read_batches=1, n_images=CALIB)
    stats = calibrate(space, model, batches, [("di", {"num_classes": data.num_classes})], n_images=CALIB,
                      progress=False)
    di = criteria.score("di", space, stats, num_classes=data.num_classes)
    weights = {"di": 0.5, "fpar": 0.5}
    seen = record_scores(monkeypatch)
    result = prune(model, data, "flops<=50%", method="uniform", criterion=weights, finetune_epochs=0,
                   calib_images=CALIB, bn_batches=2, progress=False, device="cpu",
                   criterion_params={"fpar": {"lam": 0.5, "steps": 5, "read_batches": 1}})
    assert result.report["criterion"] == weights
    assert_scores_equal(seen["fpar"], fpar)
    assert_scores_equal(seen["di"], di)
    mixed = criteria.mix(weights, {"di": di, "fpar": fpar})
    assert result.plan.keep == select(space, result.plan.kept_widths(), scores=mixed).keep
    assert ap.fvcore_cost(result.model, x_of(data)).flops <= result.report["budget"]["target"]


def test_cli_prune_with_criterion_fpar(trained_once, tmp_path, capsys):
    model, data = trained_once
    base = tmp_path / "base.pt"
    checkpoint.save_baseline(base, model, data=data.settings | {"name": "digits"},
                             input_shape=list(data.input_shape))
    out = tmp_path / "run"
    code = cli.main(["prune", "--checkpoint", str(base), "--flops", "50%", "--method", "uniform",
                     "--criterion", "fpar", "--epochs", "0", "--calib-images", str(CALIB), "--out", str(out),
                     "--no-progress"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["criterion"] == {"fpar": 1.0}
    recount = ap.fvcore_cost(ap.load(out / "model.pt"), x_of(data))
    assert report["pruned"]["flops"] == recount.flops <= report["budget"]["target"]


def test_search_space_naming_fpar_loads_and_the_driver_scores_it(trained, tmp_path):
    model, data = trained
    path = tmp_path / "fpar.yaml"
    path.write_text(SPACE.replace("CRITERIA", "l1, fpar"))
    spec = load(path)
    assert spec.criteria == ["l1", "fpar"]
    space, scores, _ = driver_state(model, data, spec, ap.Budget.parse("flops<=50%"), seed=2,
                                    calib_images=CALIB, progress=False, device="cpu")
    expected = fpar_scores(space, model, calibration_images(data, seed=2), seed=2, n_images=CALIB)
    assert_scores_equal(scores["fpar"], expected)
    assert_scores_equal(scores["l1"], criteria.score("l1", space))


@pytest.mark.slow
def test_two_trial_search_over_fpar(trained, tmp_path):
    from autoprune.search.runner import search

    model, data = trained
    path = tmp_path / "fpar.yaml"
    path.write_text(SPACE.replace("CRITERIA", "fpar"))
    space = ap.Space(model, x_of(data))
    expected = fpar_scores(space, model, calibration_images(data, seed=0), seed=0, n_images=CALIB)
    result = search(model, data, "flops<=50%", space=path, trials=2, workers=1, finetune_epochs=0,
                    calib_images=CALIB, bn_batches=2, out=tmp_path / "run", progress=False, device="cpu")
    report = result.report
    assert [r["state"] for r in report["trials"]] == ["COMPLETE", "COMPLETE"]
    assert report["criterion"] == {"fpar": 1.0}
    recount = ap.fvcore_cost(result.model, x_of(data))
    assert report["pruned"]["flops"] == recount.flops <= report["budget"]["target"]
    # the best structure's channels are those fpar's scores rank highest
    assert result.plan.keep == select(space, result.plan.kept_widths(), scores=expected).keep


@pytest.mark.parametrize("criterion, params, fact", [
    ("fpar", {"fpar": {"steps": -1}}, "fpar setting steps must be an integer in 0..100000, got -1"),
    ("fpar", {"fpar": {"mode": "bogus"}}, "fpar setting mode must be one of auto, native, probe"),
    ("fpar", {"fpar": {"lam": float("nan")}}, "fpar setting lam must be a finite number >= 0"),
    ("fpar", {"fpar": {"lr": 0}}, "fpar setting lr must be a finite number > 0"),
    ("fpar", {"fpar": {"read_batches": True}}, "fpar setting read_batches must be an integer"),
    ("fpar", {"fpar": {"lamda": 1.0}}, "criterion 'fpar' has no setting 'lamda'; its settings are lam,"),
    ("fpar", {"fpar": {"attention": {}}}, "criterion 'fpar' has no setting 'attention'"),
    ("fpar", {"di": {"rho": 1.0}}, "criterion_params names 'di', which the criterion mix (fpar) does not use"),
    ("di:1,fpar:1", {"di": {"rho": 1.0}}, "criterion 'di' has no setting 'rho'; it takes none"),
    ("fpar", {"fpar": 0.5}, "criterion_params['fpar'] must map setting names to values"),
    ("fpar", [("fpar", {})], "criterion_params must map criterion names to their settings"),
])
def test_invalid_fpar_options_are_refused_before_calibration(trained, monkeypatch, criterion, params, fact):
    model, data = trained
    calls = []
    monkeypatch.setattr(PRUNE_MODULE, "calibrate", lambda *a, **k: calls.append("calibrate"))
    monkeypatch.setattr(pipeline, "check_fits", lambda *a, **k: calls.append("check_fits"))
    with pytest.raises(CriterionError) as err:
        prune(model, data, "flops<=50%", method="uniform", criterion=criterion, criterion_params=params,
              finetune_epochs=0, progress=False, device="cpu")
    message = str(err.value)
    assert fact in message and "\n" not in message, message
    assert calls == []  # refused before any work


class Noisy(Dataset):
    """Images drawn from the global torch RNG on every access, like a random augmentation."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.rand(2) + i, i


def test_calibration_batches_repeat_their_images_and_leave_the_global_rng_alone():
    batches = pipeline.CalibrationBatches(Noisy(), n_images=20, seed=5, batch_size=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = list(batches)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert [len(x) for x, _ in first] == [8, 8, 4]
    torch.manual_seed(7)  # another global state: the same images still
    again = list(batches)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    partial = list(islice(iter(batches), 1))  # a pass stopped early leaves the RNG alone too
    assert torch.equal(partial[0][0], first[0][0])
    # the order is the seeded loader's, the 20 images distinct
    order = torch.cat([y for _, y in first])
    expected = torch.cat([y for _, y in islice(loader(Noisy(), batch_size=8, shuffle=True, seed=5), 3)])[:20]
    assert torch.equal(order, expected) and len(set(order.tolist())) == 20
