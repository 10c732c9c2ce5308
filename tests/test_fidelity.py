"""Proxy fidelity: τ-b as scipy computes it, a bootstrap interval equal to an independent
computation, ties counted, every budget × proxy measured, and the CLI writing it all."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

import autoprune as ap
from autoprune import checkpoint, fidelity
from autoprune.cli import main
from autoprune.errors import OptionError
from autoprune.search import SearchSpace
from autoprune.search.validate import Section

TINY_SPACE = """\
ratios: [{match: '.*', low: 0.0, high: 0.8, tie: stage}]
criteria: [l1]
proxy: {bn_batches: 20, finetune_steps: 3, eval_batches: 1, lr: 0.01}
"""
ASHA_SPACE = TINY_SPACE + "asha: {grace_period: 1, reduction_factor: 3}\n"


def pair_tau(a, b):
    """Kendall τ-b by counting pairs, independent of scipy and of the module; None if undefined."""
    num = untied_a = untied_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        sa, sb = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
        num += sa * sb
        untied_a += sa != 0
        untied_b += sb != 0
    return num / (untied_a * untied_b) ** 0.5 if untied_a and untied_b else None


def pair_ties(values):
    return sum(values[i] == values[j] for i, j in itertools.combinations(range(len(values)), 2))


# --------------------------------------------------------------------------- statistics on constructed data


def test_tau_is_scipys_tau_b_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 30).astype(float)  # many ties on both sides
    y = x + rng.integers(0, 4, 30)
    assert fidelity.kendall_tau(x, y) == pytest.approx(kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert fidelity.kendall_tau(x, y) == pytest.approx(pair_tau(x, y), abs=1e-12)
    assert fidelity.kendall_tau([1, 1, 1], [1, 2, 3]) is None  # a constant side: undefined, not NaN


@pytest.mark.parametrize("x", [
    np.round(np.random.default_rng(1).normal(size=15), 1),  # a few ties
    np.array([0.0] * 13 + [1.0] * 2),  # most resamples hold one value of x: τ undefined there
])
def test_bootstrap_interval_equals_an_independent_computation(x):
    y = np.round(x + np.random.default_rng(2).normal(size=len(x)), 1)
    got = fidelity.bootstrap_tau(x, y, resamples=400, seed=7, confidence=0.9)
    index = np.random.default_rng(7).integers(0, len(x), size=(400, len(x)))
    taus = [pair_tau(x[i], y[i]) for i in index]
    defined = [t for t in taus if t is not None]
    low, high = np.percentile(defined, [5, 95])
    assert got["low"] == pytest.approx(low, abs=1e-12) and got["high"] == pytest.approx(high, abs=1e-12)
    assert got["undefined"] == taus.count(None)
    assert got["undefined"] > 0 if len(set(x)) == 2 else got["undefined"] == 0


def test_tau_rows_count_ties_and_cover_every_budget_and_proxy():
    proxy = [0.5, 0.5, 0.5, 0.7, 0.7, 0.1]  # 3 + 1 tied pairs
    final = [0.9, 0.8, 0.8, 0.95, 0.6, 0.3]  # 1 tied pair
    cands = {b: [{"proxy": {"adaptive_bn": p, "finetune_3": -p}, "final": f} for p, f in zip(proxy, final)]
             for b in ("flops<=60%", "flops<=40%")}
    rows = fidelity.tau_rows(cands, ["adaptive_bn", "finetune_3"], resamples=50, seed=1)
    assert [(r["budget"], r["proxy"]) for r in rows] == [(b, p) for b in cands for p in ("adaptive_bn", "finetune_3")]
    assert {r["ties"] for r in rows} == {pair_ties(proxy)} == {4}
    assert {r["ties_final"] for r in rows} == {1} and {r["n"] for r in rows} == {6}
    bn = rows[0]["tau"]
    assert bn == pytest.approx(pair_tau(proxy, final)) and rows[1]["tau"] == pytest.approx(-bn)
    table = fidelity.markdown({"confidence": 0.95, "tau": rows})
    assert table.splitlines()[0] == ("| budget | proxy | Kendall τ | 95% CI | n | ties | best of 6 by proxy, % "
                                     "| unranked, % | best of 6, % |")  # k = 16 capped at the 6 structures
    # best of all 6: the proxy's top group (0.7, 0.7) for adaptive_bn, the lone 0.1 for its negation
    assert {r["k"] for r in rows} == {6} and rows[0]["best_of_k"] == pytest.approx((0.95 + 0.6) / 2)
    assert rows[1]["best_of_k"] == pytest.approx(0.3) and rows[0]["oracle_of_k"] == pytest.approx(0.95)
    assert rows[0]["unranked"] == pytest.approx(np.mean(final))
    assert (f"| flops<=40% | finetune_3 | {-bn:.2f} | [{rows[3]['ci_low']:.2f}, {rows[3]['ci_high']:.2f}] | 6 | 4 "
            f"| 30.00 | {100 * np.mean(final):.2f} | 95.00 |") in table


def brute_best_of_k(score, final, k):
    """Every k-subset equally likely; within it the top score's tied members equally likely."""
    picks = []
    for subset in itertools.combinations(range(len(score)), k):
        top = max(score[i] for i in subset)
        picks.append(np.mean([final[i] for i in subset if score[i] == top]))
    return float(np.mean(picks))


@pytest.mark.parametrize("seed", range(6))
def test_best_of_k_equals_brute_force_over_every_subset(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    score = rng.integers(0, 4, n).astype(float)  # many ties
    final = rng.normal(size=n)
    for k in range(1, n + 1):
        assert fidelity.best_of_k(score, final, k) == pytest.approx(brute_best_of_k(score, final, k), abs=1e-12)
    assert fidelity.best_of_k(score, final, 1) == pytest.approx(np.mean(final))  # one draw: no ranking
    assert fidelity.best_of_k(final, final, n) == pytest.approx(np.max(final))  # all drawn: the best


@pytest.mark.parametrize("k", [0, 4])
def test_best_of_k_refuses_k_outside_the_items(k):
    with pytest.raises(OptionError, match="k must be from 1 to the 3 items"):
        fidelity.best_of_k([1, 2, 3], [1, 2, 3], k)


def test_proxies_are_every_length_the_space_offers():
    spec = SearchSpace.from_dict({"ratios": [{"high": 0.5}], "criteria": ["l1"], "proxy": {"finetune_steps": 9},
                                  "asha": {"grace_period": 1, "reduction_factor": 3}})
    assert [(p["name"], p["steps"]) for p in fidelity.proxies(spec)] == \
        [("finetune_1_of_9", 1), ("finetune_3_of_9", 3), ("finetune_9", 9)]  # ASHA's rungs
    plain = replace(spec, asha=None)
    assert [p["name"] for p in fidelity.proxies(plain)] == ["finetune_9"]
    choices = replace(plain, proxy=Section({**plain.proxy, "finetune_steps": [20, 5, 0, 5]}))
    assert [p["steps"] for p in fidelity.proxies(choices)] == [5, 20]  # 0 is adaptive BN alone, always measured


@pytest.mark.parametrize("kw, fact", [
    ({"n": 2}, "from 3"),
    ({"budgets": "flops<=50%"}, "non-empty list"),
    ({"budgets": ["flops<=50%", "flops<=0.5"]}, "distinct"),
    ({"confidence": 1.0}, "confidence"),
    ({"resamples": 0}, "resamples"),
])
def test_bad_options_are_refused_before_any_work(kw, fact):
    with pytest.raises(OptionError, match=fact) as info:
        fidelity.check_options(**{"budgets": ["flops<=50%"], **kw})
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- end to end (tiny)


@pytest.fixture
def baseline(trained, tmp_path):
    model, data = trained
    path = tmp_path / "base.pt"
    checkpoint.save_baseline(path, model, data=data.settings | {"name": data.name},
                             input_shape=list(data.input_shape))
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    (tmp_path / "asha.yaml").write_text(ASHA_SPACE)
    return path, model, data


def test_fidelity_command_measures_every_budget_and_proxy(baseline, tmp_path, capsys):
    path, model, data = baseline
    out = tmp_path / "fid"
    code = main(["fidelity", "--checkpoint", str(path), "--flops", "60%", "40%", "--n", "3", "--epochs", "0",
                 "--space", str(tmp_path / "asha.yaml"), "--bn-batches", "2", "--pick", "2", "--out", str(out),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    result = json.loads((out / "fidelity.json").read_text())
    names = ["adaptive_bn", "finetune_1_of_3", "finetune_3"]  # ASHA rungs 1 and 3 of 3 steps
    assert [p["name"] for p in result["proxies"]] == names
    assert len(result["tau"]) == 2 * len(names)  # 2 budgets x (adaptive BN + 2 proxy lengths)
    assert result["proxy"]["bn_batches"] == 2  # the caller's BN recipe, not the space's 20
    base = ap.fvcore_cost(model, torch.zeros(1, *data.input_shape)).flops
    configs = [[c["config"] for c in result["candidates"][b]] for b in result["budgets"]]
    assert configs[0] == configs[1] and len(configs[0]) == 3  # the same structures at every budget
    for row in result["tau"]:
        cands = result["candidates"][row["budget"]]
        proxy, final = [c["proxy"][row["proxy"]] for c in cands], [c["final"] for c in cands]
        expected = pair_tau(proxy, final)
        assert (row["tau"] is None and expected is None) or row["tau"] == pytest.approx(expected)
        assert row["ties"] == pair_ties(proxy) and row["n"] == 3
        assert row["k"] == 2 and row["best_of_k"] == pytest.approx(brute_best_of_k(proxy, final, 2))
        limit = float(row["budget"].split("<=")[1].rstrip("%")) / 100
        assert all(c["flops"] <= limit * base for c in cands)
        # epochs 0: the final accuracy is the accuracy right after adaptive BN
        assert all(c["final"] == c["accuracy_adaptive_bn"] for c in cands)
    table = (out / "fidelity.md").read_text().splitlines()
    assert len(table) == 2 + len(result["tau"]) and table == fidelity.markdown(result).splitlines()


def _compare_argv(path, tmp_path, out):
    return ["compare", "--checkpoint", str(path), "--flops", "50%", "--methods", "uniform", "--criterion", "l1",
            "--seeds", "0", "--epochs", "0", "--space", str(tmp_path / "tiny.yaml"), "--out", str(out),
            "--no-progress"]


def test_compare_fidelity_refuses_too_few_structures_before_any_run(baseline, tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main([*_compare_argv(baseline[0], tmp_path, out), "--fidelity", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--fidelity" in err[0] and "from 3" in err[0]
    assert not (out / "results.json").exists()


@pytest.mark.slow  # about 40 s on a shared 2-core machine: 50 adaptive-BN batches per proxy, as the runs
def test_compare_fidelity_writes_json_and_markdown_for_every_budget(baseline, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main([*_compare_argv(baseline[0], tmp_path, out), "--fidelity", "3"]) == 0, capsys.readouterr().err
    result = json.loads((out / "fidelity.json").read_text())
    assert [(r["budget"], r["proxy"]) for r in result["tau"]] == \
        [("flops<=50%", "adaptive_bn"), ("flops<=50%", "finetune_3")]
    assert result["bn_batches"] == 50  # the runs' default recipe
    assert (out / "fidelity.md").read_text() == fidelity.markdown(result)
    assert (out / "results.json").is_file()


# --------------------------------------------------------------------------- resuming an interrupted study


def _fidelity_argv(path, tmp_path, out, *extra):
    return ["fidelity", "--checkpoint", str(path), "--flops", "60%", "40%", "--n", "3", "--epochs", "0",
            "--space", str(tmp_path / "tiny.yaml"), "--bn-batches", "2", "--out", str(out), "--no-progress",
            *extra]


@pytest.fixture
def builds(monkeypatch):
    """Counts the structures the study builds; ``builds.stop_at = k`` interrupts the k-th (Ctrl-C)."""
    from autoprune.search import trial

    real, calls = trial.build_structure, []

    def counted(*args, **kw):
        calls.append(1)
        if len(calls) == getattr(counted, "stop_at", None):
            raise KeyboardInterrupt
        return real(*args, **kw)
    counted.calls = calls
    monkeypatch.setattr(trial, "build_structure", counted)
    return counted


def test_an_interrupted_study_resumes_with_only_the_structures_it_lacks(baseline, tmp_path, capsys, builds):
    path = baseline[0]
    fresh = tmp_path / "fresh"
    assert main(_fidelity_argv(path, tmp_path, fresh)) == 0, capsys.readouterr().err
    expected = json.loads((fresh / "fidelity.json").read_text())
    per = len(builds.calls) // 6  # builds per structure (its own, then each proxy's)
    assert per * 6 == len(builds.calls) and not (fresh / fidelity.PROGRESS_FILE).exists()  # removed once finished

    out = tmp_path / "fid"
    builds.calls.clear()
    builds.stop_at = 4 * per + 1  # Ctrl-C as the second structure of the second budget starts
    assert main(_fidelity_argv(path, tmp_path, out)) == 130
    kept = json.loads((out / fidelity.PROGRESS_FILE).read_text())["rows"]
    assert [len(kept[b]) for b in expected["budgets"]] == [3, 1] and not (out / "fidelity.json").exists()

    builds.calls.clear()
    builds.stop_at = None
    capsys.readouterr()
    assert main(_fidelity_argv(path, tmp_path, out)) == 0, capsys.readouterr().err
    assert len(builds.calls) == 2 * per  # only the two structures the first run lacked
    assert "resuming" in capsys.readouterr().err
    result = json.loads((out / "fidelity.json").read_text())
    assert result["candidates"] == expected["candidates"] and result["tau"] == expected["tau"]
    assert not (out / fidelity.PROGRESS_FILE).exists()


def _interrupted_after_one_structure(argv, monkeypatch) -> None:
    """Run ``argv``, Ctrl-C right after the first structure is kept."""
    from autoprune.fidelity_progress import Progress

    real = Progress.add

    def add(self, budget, row):
        real(self, budget, row)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(Progress, "add", add)
        assert main(argv) == 130


def test_a_study_with_other_settings_starts_over_and_says_why(baseline, tmp_path, capsys, builds, monkeypatch):
    out = tmp_path / "fid"
    _interrupted_after_one_structure(_fidelity_argv(baseline[0], tmp_path, out), monkeypatch)
    builds.calls.clear()
    capsys.readouterr()
    assert main(_fidelity_argv(baseline[0], tmp_path, out, "--bn-batches", "3")) == 0
    err = capsys.readouterr().err
    assert "other settings (bn_batches 2 -> 3)" in err and "starting over" in err and "resuming" not in err
    assert len(builds.calls) % 6 == 0 and len(builds.calls) >= 6  # every structure of both budgets again


@pytest.mark.parametrize("damage, fact", [
    (lambda r: "{not json", "Expecting"),
    (lambda r: json.dumps([r]), "not an object with rows"),
    (lambda r: json.dumps(r | {"rows": {"flops<=60%": r["rows"]["flops<=60%"]}}), "budgets"),
    (lambda r: json.dumps(r | {"rows": {b: [v | {"config": {"x": 1}} for v in rows]
                                        for b, rows in r["rows"].items()}}), "not structure 0"),
    (lambda r: json.dumps(r | {"rows": {b: [v | {"final": 7.0} for v in rows]
                                        for b, rows in r["rows"].items()}}), "from 0 to 1"),
    (lambda r: json.dumps(r | {"rows": {b: [v | {"proxy": {}} for v in rows]
                                        for b, rows in r["rows"].items()}}), "proxy must give"),
    (lambda r: json.dumps(r | {"rows": {b: [v | {"candidate": False} for v in rows]
                                        for b, rows in r["rows"].items()}}), "not structure 0"),
    (lambda r: "[" * 100_000 + "]" * 100_000, "recursion"),
    (lambda r: " " * (1 + (64 << 20)), "larger than 64 MiB"),
], ids=["json", "shape", "budgets", "structure", "accuracy", "proxy", "bool", "deep", "huge"])
def test_a_damaged_progress_record_is_refused_with_one_line(baseline, tmp_path, capsys, builds, monkeypatch,
                                                           damage, fact):
    out = tmp_path / "fid"
    _interrupted_after_one_structure(_fidelity_argv(baseline[0], tmp_path, out), monkeypatch)
    record = out / fidelity.PROGRESS_FILE
    record.write_text(damage(json.loads(record.read_text())))
    builds.calls.clear()
    capsys.readouterr()
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(record) in err[0] and fact in err[0] and "delete it" in err[0], err
    assert not builds.calls and not (out / "fidelity.json").exists()


def test_a_progress_path_that_is_not_a_file_is_refused_before_any_work(baseline, tmp_path, capsys, monkeypatch):
    from autoprune.search import runner

    out = tmp_path / "fid"
    (out / fidelity.PROGRESS_FILE).mkdir(parents=True)
    monkeypatch.setattr(runner, "driver_state", lambda *a, **k: pytest.fail("calibrated before the check"))
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a file" in err[0] and "delete it" in err[0]


# --------------------------------------------------------------------------- reusing a finished study


def test_a_finished_study_with_the_same_settings_is_reused_without_calibrating(baseline, tmp_path, capsys, builds,
                                                                              monkeypatch):
    from autoprune.search import runner

    out = tmp_path / "fid"
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 0, capsys.readouterr().err
    first = json.loads((out / "fidelity.json").read_text())
    assert first["settings"]["baseline"] and first["settings"]["options"]["n"] == 3
    builds.calls.clear()
    capsys.readouterr()
    monkeypatch.setattr(runner, "driver_state", lambda *a, **k: pytest.fail("calibrated a finished study"))
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 0
    captured = capsys.readouterr()
    assert not builds.calls and "already holds this study" in captured.err
    assert json.loads((out / "fidelity.json").read_text()) == first
    assert fidelity.markdown(first) in captured.out


@pytest.mark.parametrize("change, why", [
    (lambda r: {k: v for k, v in r.items() if k != "settings"}, "records no settings"),
    (lambda r: r | {"settings": r["settings"] | {"baseline": "0" * 64}}, "other settings (baseline"),
], ids=["older", "baseline"])
def test_a_finished_study_of_another_baseline_or_version_is_measured_again(baseline, tmp_path, capsys, builds,
                                                                          change, why):
    out = tmp_path / "fid"
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 0, capsys.readouterr().err
    study = out / "fidelity.json"
    first = json.loads(study.read_text())
    study.write_text(json.dumps(change(first | {"candidates": {b: [r | {"final": 0.5} for r in rows]
                                                               for b, rows in first["candidates"].items()}})))
    per_run = len(builds.calls)
    builds.calls.clear()
    capsys.readouterr()
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 0
    err = capsys.readouterr().err
    assert why in err and "measuring again" in err and len(builds.calls) == per_run  # every structure again
    assert json.loads(study.read_text()) == first  # the altered rows were not kept


@pytest.mark.parametrize("damage, fact", [
    (lambda r: "{not json", "Expecting"),
    (lambda r: json.dumps(r | {"settings": 3}), "settings are not an object"),
    (lambda r: json.dumps(r | {"candidates": {b: rows[:2] for b, rows in r["candidates"].items()}}), "exactly 3"),
    (lambda r: json.dumps(r | {"candidates": {b: [v | {"final": 7.0} for v in rows]
                                              for b, rows in r["candidates"].items()}}), "from 0 to 1"),
], ids=["json", "settings", "short", "accuracy"])
def test_a_damaged_finished_study_is_refused_with_one_line(baseline, tmp_path, capsys, builds, damage, fact):
    out = tmp_path / "fid"
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 0, capsys.readouterr().err
    study = out / "fidelity.json"
    study.write_text(damage(json.loads(study.read_text())))
    builds.calls.clear()
    capsys.readouterr()
    assert main(_fidelity_argv(baseline[0], tmp_path, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(study) in err[0] and fact in err[0] and "delete it" in err[0], err
    assert not builds.calls


def test_fidelity_refuses_a_pick_of_zero_in_one_line_naming_the_option(tmp_path, capsys):
    code = main(["fidelity", "--checkpoint", str(tmp_path / "absent.pt"), "--flops", "50%", "--pick", "0",
                 "--out", str(tmp_path / "fid")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--pick" in err[0]
    assert not (tmp_path / "fid").exists()


def test_a_pick_beyond_n_is_accepted_and_capped_at_n():
    fidelity.check_options(pick=20_000, budgets=["flops<=50%"])  # compare --trials 20000 --fidelity 24 is valid
    cands = {"flops<=50%": [{"proxy": {"adaptive_bn": p}, "final": f} for p, f in ((0.2, 0.8), (0.1, 0.9), (0.3, 0.7))]}
    (row,) = fidelity.tau_rows(cands, ["adaptive_bn"], resamples=10, pick=20_000)
    assert row["k"] == 3 and row["best_of_k"] == pytest.approx(0.7) and row["oracle_of_k"] == pytest.approx(0.9)


def test_the_command_line_default_pick_is_the_modules():
    from autoprune.cli import build_parser
    args = build_parser().parse_args(["fidelity", "--checkpoint", "x.pt", "--flops", "50%", "--out", "o"])
    assert args.pick == fidelity.DEFAULT_PICK


def test_best_of_k_is_fast_and_exact_for_the_largest_study():
    n = fidelity.MAX_N
    score = np.arange(n, dtype=float)[::-1]  # item j is the j-th best, and its final is j
    final = np.arange(n, dtype=float)
    k = n // 2  # E[min index of a k-subset] = (n − k)/(k + 1)
    assert fidelity.best_of_k(score, final, k) == pytest.approx((n - k) / (k + 1), rel=1e-9)
