"""Width methods: one registry, generated lists, a toy method through prune, HPSE's k."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import autoprune as ap
from autoprune import grouping, methods, pipeline
from autoprune.calibrate import calibrate
from autoprune.cli import build_parser
from autoprune.data import loader
from autoprune.errors import AutopruneError
from autoprune.prune import prune

BUILTIN = ("uniform", "greedy", "wsp", "tp_global", "search", "random", "search_widths", "selfgroup", "fastnas")


def _help(*argv: str) -> str:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[argv[0]]  # argparse's own subparser table
    return " ".join(sub.format_help().split())


class LastStage(methods.WidthMethod):
    """The README's example: prune only the units of the last stage (``layer3``)."""

    name = "last_stage"
    help = "prune only the last stage, evenly"

    def widths(self, space, budget, context):
        ratios = {u.name: 0.5 if u.name.startswith("layer3") else 0.0 for u in space.units}
        return methods.WidthResult(space.fit(ratios, budget))


@pytest.fixture
def toy_registered(monkeypatch):
    """LastStage registered for one test, the registry restored afterwards."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    methods.register(LastStage)
    return LastStage


def test_registry_lists_exactly_the_methods_in_order():
    assert methods.available() == BUILTIN
    assert [type(methods.get(n)).name for n in BUILTIN] == list(BUILTIN)
    assert importlib.import_module("autoprune.compare").DEFAULT_METHODS == BUILTIN
    assert all(isinstance(methods.get(n).help, str) and "\n" not in methods.get(n).help for n in BUILTIN)


def test_unknown_method_is_one_line_listing_the_registry():
    with pytest.raises(AutopruneError) as info:
        methods.get("nope")
    assert str(info.value) == "unknown method 'nope'; choose one of " + ", ".join(BUILTIN)
    with pytest.raises(ValueError, match="unknown method"):  # an OptionError is a ValueError too
        pipeline.check_options("nope")


def test_search_is_registered_but_runs_only_as_a_search():
    with pytest.raises(AutopruneError, match="autoprune.search.search"):
        pipeline.check_options("search")
    with pytest.raises(AutopruneError, match="autoprune.search.search"):
        methods.get("search").widths(None, ap.Budget.parse("flops<=50%"), None)


def test_registering_twice_under_one_name_is_refused(toy_registered):
    methods.register(LastStage)  # the same class again: a no-op

    class Other(LastStage):
        pass
    with pytest.raises(AutopruneError, match="already registered"):
        methods.register(Other)


def test_cli_lists_are_generated_from_the_registry(toy_registered):
    prune_help, compare_help = _help("prune"), _help("compare")
    for name in (*BUILTIN, "last_stage"):
        assert f"{name}: " in prune_help or f"{name} (default): " in prune_help, name
        assert methods.get(name).help in prune_help
    assert ",".join((*BUILTIN, "last_stage")) in "".join(compare_help.split())  # argparse wraps the list
    args = build_parser().parse_args(["compare", "--flops", "50%", "--out", "x"])
    assert args.methods == ",".join(methods.available())


def test_a_method_registered_in_one_class_runs_through_prune(trained, toy_registered, tmp_path):
    model, data = trained
    result = prune(model, data, "flops<=85%", method="last_stage", finetune_epochs=0, calib_images=64,
                   bn_batches=2, out=tmp_path, progress=False)
    widths = result.report["widths"]
    assert result.report["method"] == "last_stage" and result.plan.meta["method"] == "last_stage"
    assert all(kept == full for u, (kept, full) in widths.items() if not u.startswith("layer3"))
    assert any(kept < full for u, (kept, full) in widths.items() if u.startswith("layer3"))
    b = result.report["budget"]
    assert b["realized"] <= b["target"] and b["value"] == 0.85 and b["relative"] is True
    recount = ap.fvcore_cost(ap.load(tmp_path / "model.pt"), torch.zeros(1, *data.input_shape))
    assert recount.flops == result.report["pruned"]["flops"] == b["realized"]


def test_prune_hpse_clusters_with_k_keeps_channels_per_k_clusters(trained):
    """cluster_k reaches HPSE's calibration (it used to fail: "calibrated with k=..."), and
    each unit keeps its top-scored channels from each of the k=4 clusters in proportion."""
    model, data = trained
    seed, n_images = 0, 64
    result = prune(model, data, "flops<=50%", method="uniform", criterion="hpse", clusters="hpse",
                   cluster_k=4, finetune_epochs=0, calib_images=n_images, bn_batches=2, seed=seed,
                   progress=False, device="cpu")
    assert result.report["cluster_k"] == 4
    # the clusters and scores again, from a calibration of our own
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    stats = calibrate(space, model, loader(data.train, batch_size=64, shuffle=True, seed=seed),
                      [("hpse", {"k": 4})], n_images=n_images, progress=False)
    labels = grouping.cluster("hpse", space, stats, 4)
    scores = ap.criteria.score("hpse", space, stats)
    pruned_units = 0
    for unit in space.units:
        lab, s = labels[unit.name], scores[unit.name].numpy()
        assert stats.of("hpse")[unit.name]["votes"].shape[1] == 4  # the default: 1 for 16 channels
        keep = result.plan.keep.get(unit.name)
        if keep is None:
            continue
        pruned_units += 1
        clusters = np.unique(lab)
        assert len(clusters) > 1
        for c in clusters:
            members = np.flatnonzero(lab == c)
            kept_here = sorted(set(keep) & set(members.tolist()))
            share = len(keep) * len(members) / unit.width
            assert abs(len(kept_here) - share) < 1 + 1e-9
            assert len(kept_here) >= 1 or len(keep) < len(clusters)
            best = members[np.argsort(-s[members], kind="stable")][:len(kept_here)]
            assert np.allclose(np.sort(s[kept_here]), np.sort(s[best]))  # the cluster's strongest
    assert pruned_units == len(space.units)


def test_calibration_specs_pass_hpse_k_and_di_classes():
    assert pipeline.calibration_specs(["di"], "hpse", 4, 10) == [("di", {"num_classes": 10}), ("hpse", {"k": 4})]
    assert pipeline.calibration_specs(["hpse", "l1"], "hpse", None, 10) == ["hpse"]
    assert pipeline.calibration_specs(["l1"], "fchp", 3, 10) == ["fchp"]
    assert pipeline.criterion_params("di", 7) == {"num_classes": 7} and pipeline.criterion_params("l1", 7) == {}


@pytest.mark.parametrize("kw,needle", [
    ({"cluster_k": 0}, "cluster_k must be a positive integer"),
    ({"clusters": "kmeans"}, "unknown clusters 'kmeans'; choose one of hpse, fchp, sg"),
    ({"greedy_step": 2.0}, "greedy_step"),
    ({"greedy_bn_batches": -1}, "greedy_bn_batches"),
])
def test_check_options_names_the_parameter_and_choices(kw, needle):
    with pytest.raises(AutopruneError, match=needle):
        pipeline.check_options("greedy", **kw)


def test_cli_wsp_variant_reaches_prune_and_bad_values_are_one_line(prune_call, capsys, tmp_path):
    """--wsp-variant weight|data is parsed, checked and passed to autoprune.prune."""
    from autoprune import cli
    argv = ["prune", "--model", "resnet20", "--data", "synthetic", "--flops", "50%", "--out", str(tmp_path),
            "--method", "wsp"]
    for variant in ("weight", "data"):
        kw = prune_call([*argv, "--wsp-variant", variant])
        assert (kw["method"], kw["wsp_variant"]) == ("wsp", variant)
    kw = prune_call(argv)
    assert (kw["method"], kw["wsp_variant"]) == ("wsp", "weight")  # the default
    assert cli.main([*argv, "--wsp-variant", "grad"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--wsp-variant" in err and "'weight', 'data'" in err
    assert "--wsp-variant {weight,data}" in _help("prune")
