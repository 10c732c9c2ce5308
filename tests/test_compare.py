"""compare: every method meets each budget; table, CSV, JSON and plots agree; finished runs
are reused only when every setting matches."""

import csv
import json

import pytest
import torch
import yaml

import autoprune as ap
from autoprune.compare import compare
from autoprune.pipeline import Result
from autoprune.prune import prune_settings


TINY_SPACE = """\
ratios: [{match: '.*', low: 0.0, high: 0.8, tie: stage}]
criteria: [l1]
proxy: {bn_batches: 2, finetune_steps: 5, eval_batches: 1, lr: 0.01}
"""


def _check_written(results, out, methods, model, data):
    """Every method meets its budget; CSV, JSON, markdown table and plots agree."""
    base = ap.fvcore_cost(model, torch.zeros(1, *data.input_shape)).flops
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 2 * len(methods)
    for row in rows:
        limit = float(row["budget"].split("<=")[1].rstrip("%")) / 100
        assert int(row["flops"]) <= limit * base
        assert float(row["flops_ratio"]) == pytest.approx(int(row["flops"]) / base)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == results["rows"]
    table = (out / "results.md").read_text()
    for s in results["summary"]:  # one table per budget, one row per arm
        section = table.split(f"### {s['budget']}\n")[1].split("###")[0]
        assert f"| {s['method']} | {100 * s['accuracy_mean']:.2f} ± 0.00 | none (n = 1) | 1 |" in section
    for row in rows:  # compute columns: no fine-tune (0 epochs), so no search cost
        assert row["finetunes"] == "0" and row["search_cost"] == "" and float(row["method_s"]) >= 0
    csv_acc = {(r["budget"], r["method"]): float(r["accuracy"]) for r in rows}
    assert all(csv_acc[(s["budget"], s["method"])] == pytest.approx(s["accuracy_mean"])
               for s in results["summary"])
    for name in ("accuracy_vs_flops.png", "widths_flops-60pct.png", "widths_flops-40pct.png"):
        assert (out / name).stat().st_size > 1000


def test_compare_tiny(trained, tmp_path):
    model, data = trained
    methods = ("uniform", "greedy", "wsp", "tp_global")
    kw = dict(budgets=("flops<=60%", "flops<=40%"), methods=methods, seeds=(0,), finetune_epochs=0,
              out=tmp_path, progress=False, calib_images=64, bn_batches=3,
              greedy_step=0.05)  # the authors' greedy (the default) in 5%-of-FLOPs steps: fast enough here
    results = compare(model, data, **kw)
    _check_written(results, tmp_path, methods, model, data)
    report = tmp_path / "runs" / "flops-40pct-greedy-s0" / "report.json"
    marked = json.loads(report.read_text())
    marked["elapsed_s"] = -1.0  # a finished run is reused, not recomputed, when compare runs again
    report.write_text(json.dumps(marked))
    again = compare(model, data, **kw)
    assert [r["elapsed_s"] for r in again["rows"] if r["method"] == "greedy"] == \
        [r["elapsed_s"] for r in results["rows"] if r["method"] == "greedy"][:1] + [-1.0]


@pytest.mark.slow
def test_compare_with_search(trained, tmp_path):
    """The search as an arm beside uniform at two budgets (the other width arms at these budgets:
    test_compare_tiny; every arm at one budget: test_every_arm_meets_an_aggressive_budget)."""
    model, data = trained
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    methods = ("uniform", "search")
    results = compare(model, data, budgets=("flops<=60%", "flops<=40%"), methods=methods, seeds=(0,),
                      finetune_epochs=0, out=tmp_path, progress=False, calib_images=64, bn_batches=3,
                      space=tmp_path / "tiny.yaml", trials=3, workers=2, greedy_step=0.05)
    _check_written(results, tmp_path, methods, model, data)
    for budget in ("60", "40"):
        report = json.loads((tmp_path / "runs" / f"flops-{budget}pct-search-s0" / "report.json").read_text())
        assert len(report["trials"]) == 3 and report["seeds"]["uniform"]["number"] == 0


@pytest.fixture
def untrained():
    """An untrained ResNet-20 and 8x8 digits: enough for tests that run no pruning."""
    torch.manual_seed(0)
    return ap.models.create("resnet20", num_classes=10).eval(), ap.data.load("digits", image_size=8)


def _fake_report(method: str, settings: dict | None = None) -> dict:
    report = json.loads(json.dumps(FAKE_REPORT))
    report["method"] = method
    if settings is not None:
        report["settings"] = json.loads(json.dumps(settings))
    return report


def _finished_run(out, model, data, method, **kw):
    """A finished run folder of ``method`` at flops<=50%, seed 0, recorded with settings ``kw``."""
    run = out / "runs" / f"flops-50pct-{method}-s0"
    run.mkdir(parents=True)
    settings = prune_settings(model, data, "flops<=50%", method, seed=0, **kw)
    (run / "report.json").write_text(json.dumps(_fake_report(method, settings)))
    return run


@pytest.fixture
def pruned_calls(monkeypatch):
    """compare's prune replaced by one that records ``(method, kw)`` and reports its settings."""
    import importlib
    compare_module = importlib.import_module("autoprune.compare")  # the module, not ap.compare
    calls = []

    def fake_prune(model, data, budget, method, **kw):
        calls.append((method, kw))
        return Result(model, None, _fake_report(method, prune_settings(model, data, budget, method, **kw)))
    monkeypatch.setattr(compare_module, "prune", fake_prune)
    return calls


def test_reuse_needs_every_setting_to_match(untrained, tmp_path, pruned_calls, capsys):
    """The same settings: reused, prune never called. Other epochs, or another baseline: rerun,
    with one line naming what changed."""
    model, data = untrained
    calls = pruned_calls
    _finished_run(tmp_path, model, data, "uniform", criterion=None, finetune_epochs=5, progress=False)
    kw = dict(budgets=("flops<=50%",), methods=("uniform",), seeds=(0,), out=tmp_path, progress=False)
    results = compare(model, data, finetune_epochs=5, **kw)
    assert calls == [] and results["rows"][0]["accuracy"] == FAKE_REPORT["pruned"]["accuracy"]
    assert capsys.readouterr().err == ""

    results = compare(model, data, finetune_epochs=3, **kw)
    assert len(calls) == 1 and calls[0][1]["finetune_epochs"] == 3
    assert "runs/flops-50pct-uniform-s0: rerunning (finetune_epochs 5 -> 3)" in capsys.readouterr().err

    with torch.no_grad():  # the stored run has epochs 3 now (fake_prune's report is not written, so 5)
        model.conv1.weight[0, 0, 0, 0] += 1.0
    compare(model, data, finetune_epochs=5, **kw)
    err = capsys.readouterr().err
    assert len(calls) == 2 and "rerunning (baseline " in err and "finetune_epochs" not in err


def test_the_greedys_options_belong_to_the_greedy_alone(untrained, tmp_path, pruned_calls, capsys):
    """A width method other than the greedy records none of the greedy's options, so changing
    them leaves its finished runs reusable; one recorded with them by an earlier version is
    reused too; the greedy itself reruns when its step changes."""
    model, data = untrained
    settings = prune_settings(model, data, "flops<=50%", "uniform", greedy_step=0.05)
    assert not any(k.startswith("greedy_") for k in settings["options"])
    assert prune_settings(model, data, "flops<=50%", "greedy", greedy_step=0.05)["options"]["greedy_step"] == 0.05
    run = _finished_run(tmp_path, model, data, "uniform", criterion=None, progress=False)
    report = json.loads((run / "report.json").read_text())  # as an earlier version recorded it
    report["settings"]["options"] |= {"greedy_step": 0.05, "greedy_mode": "accuracy"}
    (run / "report.json").write_text(json.dumps(report))
    _finished_run(tmp_path, model, data, "greedy", criterion=None, progress=False, greedy_step=0.05)
    kw = dict(budgets=("flops<=50%",), methods=("uniform", "greedy"), seeds=(0,), out=tmp_path, progress=False)
    compare(model, data, greedy_step=0.05, **kw)
    assert pruned_calls == [] and capsys.readouterr().err == ""
    compare(model, data, greedy_step=0.02, **kw)
    assert [m for m, _ in pruned_calls] == ["greedy"]
    assert "greedy-s0: rerunning (greedy_step 0.05 -> 0.02)" in capsys.readouterr().err


def test_a_run_records_what_it_spent_and_what_it_depends_on(untrained):
    model, data = untrained
    kw = dict(finetune_epochs=1, calib_images=32, bn_batches=2)
    report = ap.prune(model, data, "flops<=50%", method="uniform", progress=False, **kw).report
    c = report["compute"]
    assert c["finetunes"] == 1 and c["finetune_s"] == report["finetune"]["wall_s"] > 0
    assert c["search_cost"] == pytest.approx(c["method_s"] / c["finetune_s"], rel=1e-3)
    assert 0 < c["method_s"] + c["finetune_s"] <= report["elapsed_s"] + 0.01
    assert report["settings"] == prune_settings(model, data, "flops<=50%", "uniform", **kw)
    assert report["settings"]["options"]["finetune_epochs"] == 1
    assert report["settings"]["options"]["criterion"] == {"di": 1.0}  # the method's default, resolved
    assert report["settings"]["data"] == {"name": data.name, "settings": data.settings}


def test_compare_resumes_an_interrupted_search_only_with_its_settings(untrained, tmp_path, monkeypatch, capsys):
    """A search run folder holding a Tune experiment but no report is resumed when its recorded
    settings match; with other trials it is discarded and started again."""
    import importlib

    from autoprune.search import load
    search_package = importlib.import_module("autoprune.search")
    model, data = untrained
    calls = []

    def fake_search(model, data, *args, **kw):
        calls.append(kw)
        return Result(model, None, _fake_report("search"))
    monkeypatch.setattr(search_package, "search", fake_search)
    run = tmp_path / "runs" / "flops-50pct-search-s0"
    (run / "tune").mkdir(parents=True)
    space = {k: v for k, v in load("generic").as_dict().items() if k not in ("name", "path") and v is not None}
    (run / "space.yaml").write_text(yaml.safe_dump(space))
    (run / "search.json").write_text(json.dumps({
        "budget": {"kind": "flops", "value": 0.5, "relative": True}, "trials": 4, "workers": 2, "seed": 0,
        "seeds": {}, "space": "generic", "method": "search"}))
    kw = dict(budgets=("flops<=50%",), methods=("search",), seeds=(0,), finetune_epochs=0, progress=False,
              out=tmp_path, space="generic")
    results = compare(model, data, trials=4, **kw)
    assert len(calls) == 1 and calls[0]["resume"] is True and calls[0]["out"] == run
    assert "space" not in calls[0] and "trials" not in calls[0]  # the recorded settings apply
    assert results["rows"][0]["accuracy"] == FAKE_REPORT["pruned"]["accuracy"]

    compare(model, data, trials=5, **kw)
    assert len(calls) == 2 and "resume" not in calls[1] and calls[1]["trials"] == 5
    assert not (run / "tune").exists() and not (run / "search.json").exists()
    assert "starting its search again (trials 4 -> 5)" in capsys.readouterr().err


@pytest.mark.slow
def test_every_arm_meets_an_aggressive_budget(trained, tmp_path):
    """flops<=15% for every registered method, the search arms included: each meets it; the
    random arm enqueues no seeds; search_widths varies widths only, ranked by di."""
    model, data = trained
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE.replace("criteria: [l1]", "criteria: [l1, di]"))
    methods = ap.methods.available()
    results = compare(model, data, budgets=("flops<=15%",), methods=methods, seeds=(0,), finetune_epochs=0,
                      out=tmp_path, progress=False, calib_images=64, bn_batches=3,
                      space=tmp_path / "tiny.yaml", trials=3, workers=2, greedy_step=0.05)
    base = ap.fvcore_cost(model, torch.zeros(1, *data.input_shape)).flops
    # every arm meets it, or (a peer whose search space cannot go that low: fastnas) is recorded as
    # unreached with its reason, and a missing optional peer is recorded as skipped
    ran = [r["method"] for r in results["rows"]]
    assert set(ran) | {u["method"] for u in results["unreached"]} | set(results["skipped"]) == set(methods)
    assert set(ran) >= {m for m in methods if m != "fastnas"}
    assert all(u["method"] == "fastnas" and "cannot reach" in u["reason"] for u in results["unreached"])
    assert all(r["flops"] <= 0.15 * base for r in results["rows"])
    md = (tmp_path / "results.md").read_text()
    assert all(f"{m} cannot reach" in md for m in {u["method"] for u in results["unreached"]})
    reports = {m: json.loads((tmp_path / "runs" / f"flops-15pct-{m}-s0" / "report.json").read_text())
               for m in ("search", "random", "search_widths")}
    assert reports["random"]["seeds"] == {} and reports["search"]["seeds"]["uniform"]["number"] == 0
    assert all(set(t["config"]) <= {"ratio/layer1", "ratio/layer2", "ratio/layer3", "ratio/conv1"}
               for t in reports["search_widths"]["trials"])
    assert reports["search_widths"]["criterion"] == {"di": 1.0}
    assert {m: r["compute"]["proxy_evaluations"] for m, r in reports.items()} == \
        {"search": 3, "random": 3, "search_widths": 3}


FAKE_REPORT = {"method": "search", "seed": 0, "elapsed_s": 1.0, "widths": {"conv1": [8, 16]},
               "budget": {"spec": "flops<=50%"},
               "base": {"flops": 100, "params": 10, "accuracy": 0.9, "latency_ms": 1.0},
               "pruned": {"flops": 50, "params": 6, "accuracy": 0.8, "accuracy_adaptive_bn": 0.5,
                          "latency_ms": 0.6},
               "compute": {"proxy_evaluations": 4, "method_s": 2.0, "finetunes": 1, "finetune_s": 4.0,
                           "search_cost": 0.5}}


def test_kept_runs_are_restored_and_reused_on_a_fresh_machine(trained, tmp_path):
    """experiments/keep_runs.sh: `save` keeps the baseline, each finished run's report and plan
    and each finished fidelity study or an unfinished one's progress record (no models, no
    unfinished search); `restore` puts them
    into an empty folder without overwriting; compare there reuses the restored runs."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "experiments" / "keep_runs.sh"
    model, data = trained
    out, keep, fresh = tmp_path / "out", tmp_path / "keep", tmp_path / "fresh"
    kw = dict(budgets=("flops<=60%",), methods=("uniform", "wsp"), seeds=(0,), finetune_epochs=0,
              progress=False, calib_images=64, bn_batches=3)
    first = compare(model, data, out=out, **kw)
    (out / "base.pt").write_bytes(b"baseline")
    (out / "runs" / "flops-60pct-search-s0" / "tune").mkdir(parents=True)  # an unfinished search
    torn = out / "runs" / "flops-60pct-greedy-s0"  # a report but no manifest: an incomplete set
    torn.mkdir()
    (torn / "report.json").write_text("{}")
    (out / "fidelity-60").mkdir()
    (out / "fidelity-60" / "fidelity.md").write_text("table")
    (out / "fidelity-60" / "fidelity.json").write_text("{}")
    (out / "fidelity-30").mkdir()  # unfinished: no fidelity.json, its finished structures so far
    (out / "fidelity-30" / "fidelity.md").write_text("partial")
    (out / "fidelity-30" / "fidelity-progress.json").write_text("rows")
    (keep / "fidelity-60").mkdir(parents=True)  # kept while fidelity-60 was unfinished: now superseded
    (keep / "fidelity-60" / "fidelity-progress.json").write_text("old rows")
    subprocess.run(["bash", str(script), "save", str(out), str(keep)], check=True)
    kept = sorted(str(p.relative_to(keep)) for p in keep.rglob("*") if p.is_file())
    assert kept == ["base.pt", "fidelity-30/fidelity-progress.json", "fidelity-60/fidelity.json",
                    "fidelity-60/fidelity.md",
                    "runs/flops-60pct-uniform-s0/plan.json", "runs/flops-60pct-uniform-s0/report.json",
                    "runs/flops-60pct-wsp-s0/plan.json", "runs/flops-60pct-wsp-s0/report.json"]
    marked = keep / "runs" / "flops-60pct-wsp-s0" / "report.json"
    marked.write_text(json.dumps({**json.loads(marked.read_text()), "elapsed_s": -1.0}))
    (fresh / "runs" / "flops-60pct-uniform-s0").mkdir(parents=True)
    mine = fresh / "runs" / "flops-60pct-uniform-s0" / "report.json"
    mine.write_text((out / "runs" / "flops-60pct-uniform-s0" / "report.json").read_text())
    subprocess.run(["bash", str(script), "restore", str(keep), str(fresh)], check=True)
    assert (fresh / "base.pt").read_bytes() == b"baseline" and (fresh / "fidelity-60" / "fidelity.md").is_file()
    assert (fresh / "fidelity-30" / "fidelity-progress.json").read_text() == "rows"  # resumes there
    assert mine.read_text() == (out / "runs" / "flops-60pct-uniform-s0" / "report.json").read_text()
    again = compare(model, data, out=fresh, **kw)  # both runs reused: wsp's marked elapsed comes back
    assert {r["method"]: r["elapsed_s"] for r in again["rows"]} == \
        {"uniform": next(r["elapsed_s"] for r in first["rows"] if r["method"] == "uniform"), "wsp": -1.0}
    for argv, why in ((["copy", out, keep], "unknown mode copy"), (["save", tmp_path / "none", keep], "not a folder")):
        bad = subprocess.run(["bash", str(script), *map(str, argv)], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and why in bad.stderr
    assert not list(keep.rglob(".*.tmp.*"))
    # what the experiments keep under docs/results is tracked by git (not caught by runs/ ignores)
    repo = script.parents[1]
    for kept_path in ("docs/results/x/runs/flops-50pct-search-s0/report.json", "docs/results/x/base.pt",
                      "docs/results/x/fidelity-50/fidelity.json"):
        ignored = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", kept_path])
        assert ignored.returncode == 1, f"{kept_path} is ignored by .gitignore"
