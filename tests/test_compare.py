"""compare: every method meets each budget; table, CSV, JSON and plots agree."""

import csv
import json

import pytest
import torch

import autoprune as ap
from autoprune.compare import compare, proxy_fidelity


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
    for s in results["summary"]:
        assert f"| {s['budget']} | {s['method']} | {100 * s['accuracy_mean']:.2f} ± 0.00 | 1 |" in table
    csv_acc = {(r["budget"], r["method"]): float(r["accuracy"]) for r in rows}
    assert all(csv_acc[(s["budget"], s["method"])] == pytest.approx(s["accuracy_mean"])
               for s in results["summary"])
    for name in ("accuracy_vs_flops.png", "widths_flops-60pct.png", "widths_flops-40pct.png"):
        assert (out / name).stat().st_size > 1000


def test_compare_tiny(trained, tmp_path):
    model, data = trained
    methods = ("uniform", "greedy", "wsp", "tp_global")
    kw = dict(budgets=("flops<=60%", "flops<=40%"), methods=methods, seeds=(0,), finetune_epochs=0,
              out=tmp_path, progress=False, calib_images=64, bn_batches=3)
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
    model, data = trained
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    methods = ("uniform", "greedy", "wsp", "tp_global", "search")
    results = compare(model, data, budgets=("flops<=60%", "flops<=40%"), methods=methods, seeds=(0,),
                      finetune_epochs=0, out=tmp_path, progress=False, calib_images=64, bn_batches=3,
                      space=tmp_path / "tiny.yaml", trials=3, workers=2)
    _check_written(results, tmp_path, methods, model, data)
    for budget in ("60", "40"):
        report = json.loads((tmp_path / "runs" / f"flops-{budget}pct-search-s0" / "report.json").read_text())
        assert len(report["trials"]) == 3 and report["seeds"]["uniform"]["number"] == 0


def test_proxy_fidelity_tau_matches_scipy_free_count(trained, tmp_path):
    model, data = trained
    (tmp_path / "tiny.yaml").write_text(TINY_SPACE)
    fid = proxy_fidelity(model, data, "flops<=50%", n=4, space=tmp_path / "tiny.yaml", finetune_epochs=1)
    rows = fid["candidates"]
    assert len(rows) == 4 and fid["proxy"]["finetune_steps"] == 5
    target = 0.5 * ap.fvcore_cost(model, torch.zeros(1, *data.input_shape)).flops
    assert all(r["flops"] <= target for r in rows)
    assert len({r["flops"] for r in rows}) > 1  # different structures were drawn

    def tau(a, b):  # Kendall tau-b by pair counting, independent of scipy
        import itertools
        conc = disc = ta = tb = 0
        for i, j in itertools.combinations(range(len(a)), 2):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ta += 1
            elif db == 0:
                tb += 1
            elif da * db > 0:
                conc += 1
            else:
                disc += 1
        denom = ((conc + disc + ta) * (conc + disc + tb)) ** 0.5
        return (conc - disc) / denom if denom else float("nan")

    final = [r["final"] for r in rows]
    expected = tau([r["proxy_finetune"] for r in rows], final)
    got = fid["kendall_tau_proxy_finetune"]
    assert (got != got and expected != expected) or got == pytest.approx(expected)


def test_compare_resumes_an_interrupted_search(trained, tmp_path, monkeypatch):
    """A search run folder holding a Tune experiment but no report is resumed, not restarted."""
    import importlib

    from autoprune.pipeline import Result
    search_package = importlib.import_module("autoprune.search")
    model, data = trained
    calls = []

    def fake_search(model, data, **kw):
        calls.append(kw)
        report = json.loads(json.dumps(FAKE_REPORT))
        return Result(model, None, report)
    monkeypatch.setattr(search_package, "search", fake_search)
    run = tmp_path / "runs" / "flops-50pct-search-s0"
    (run / "tune").mkdir(parents=True)
    results = compare(model, data, budgets=("flops<=50%",), methods=("search",), seeds=(0,),
                      finetune_epochs=0, progress=False, out=tmp_path, space="generic", trials=4)
    assert len(calls) == 1 and calls[0]["resume"] is True and calls[0]["out"] == run
    assert "space" not in calls[0] and "trials" not in calls[0]  # the recorded settings apply
    assert results["rows"][0]["accuracy"] == FAKE_REPORT["pruned"]["accuracy"]


FAKE_REPORT = {"method": "search", "seed": 0, "elapsed_s": 1.0, "widths": {"conv1": [8, 16]},
               "budget": {"spec": "flops<=50%"},
               "base": {"flops": 100, "params": 10, "accuracy": 0.9, "latency_ms": 1.0},
               "pruned": {"flops": 50, "params": 6, "accuracy": 0.8, "accuracy_adaptive_bn": 0.5,
                          "latency_ms": 0.6}}
