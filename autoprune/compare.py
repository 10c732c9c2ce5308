"""Side-by-side comparison of width methods at several budgets, and proxy fidelity.

Every method gets the same baseline, calibration data, fine-tune recipe and seeds;
results are tabulated as mean ± std over seeds (CSV, JSON, markdown) and plotted
(accuracy vs FLOPs per method; per-unit widths of greedy vs searched structures).
``proxy_fidelity`` measures how far the search's cheap proxy can be trusted:
Kendall τ between proxy scores and accuracy after the full fine-tune.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from scipy.stats import kendalltau
from torch import nn

from . import evaluate, methods as width_methods
from .budget import Budget
from .checkpoint import atomic_write_text, write_json
from .data import DataBundle
from .errors import AutopruneError, short
from .pipeline import check_options as check_prune_options
from .prune import prune
from .search.space import SearchSpace

DEFAULT_METHODS = width_methods.available()
"""Every registered width method, in registration order (the search included)."""
FIELDS = ("budget", "method", "seed", "accuracy", "accuracy_adaptive_bn", "flops", "params",
          "flops_ratio", "latency_ms", "elapsed_s")


def check_options(methods: Sequence[str], criterion: "str | dict | None" = None,
                  space: "str | SearchSpace | None" = None, what: str = "methods") -> list[str]:
    """The methods, after checking each (and the criterion for every width method, and the
    search space when search is among them): AutopruneError naming the choices. Cheap, so
    :func:`compare` and the CLI run it before any training, calibration or pruning."""
    valid = width_methods.available()
    if isinstance(methods, str) or not methods:
        raise AutopruneError(f"{what} must be a non-empty list of methods from {', '.join(valid)}, "
                             f"got {short(methods)}")
    methods = list(methods)
    for method in methods:
        if method not in valid:
            raise AutopruneError(f"{what}: unknown method {short(method)}; choose from {', '.join(valid)}")
        if methods.count(method) > 1:
            raise AutopruneError(f"{what}: method {method!r} is given twice; give each method once")
    for method in methods:
        if method != "search":
            check_prune_options(method, criterion)
    if "search" in methods and space is not None and not isinstance(space, SearchSpace):
        from .search import load
        load(space)
    return methods


def compare(model: nn.Module, data: DataBundle,
            budgets: "Sequence[str | Budget]" = ("flops<=70%", "flops<=50%", "flops<=30%"),
            methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] = (0, 1, 2),
            finetune_epochs: int = 5, criterion: str | None = None, out: str | Path | None = None,
            progress: bool = True, **prune_kw) -> dict:
    """Run every method at every budget for every seed; write and return the results.

    ``prune_kw`` go to :func:`autoprune.prune` (e.g. ``space=``, ``trials=`` for search).
    Every option is checked (:func:`check_options`, each budget parsed once, here) before any run.
    """
    methods = check_options(methods, criterion, prune_kw.get("space"))
    budgets = [Budget.parse(b) for b in budgets]
    rows, widths = [], {}
    for budget in budgets:
        for method in methods:
            for seed in seeds:
                kw = dict(prune_kw)
                if method != "search":
                    kw = {k: v for k, v in kw.items() if k not in ("space", "trials", "workers", "address")}
                run_out = Path(out) / "runs" / f"{_slug(budget)}-{method}-s{seed}" if out else None
                try:
                    report = _run(model, data, budget, method, seed, run_out, criterion=criterion,
                                  finetune_epochs=finetune_epochs, progress=progress, **kw)
                except KeyboardInterrupt:
                    raise KeyboardInterrupt("compare stopped; run the same command again to continue "
                                            "(finished runs are reused)" if out else "") from None
                rows.append(_row(budget, method, seed, report))
                widths.setdefault(str(budget), {})[method] = report["widths"]
    summary = summarise(rows)
    results = {"rows": rows, "summary": summary, "widths": widths,
               "settings": {"budgets": [str(b) for b in budgets], "methods": list(methods), "seeds": list(seeds),
                            "finetune_epochs": finetune_epochs, "criterion": criterion,
                            "data": data.name}}
    if out is not None:
        write_results(Path(out), results)
    return results


def _run(model: nn.Module, data: DataBundle, budget: Budget, method: str, seed: int, out: Path | None,
         **kw) -> dict:
    """One method's report at one budget and seed. A run already finished in ``out`` (its
    report.json, same method, seed and budget) is reused and an interrupted search in
    ``out`` is resumed, so an interrupted compare loses nothing."""
    if out is not None and (out / "report.json").is_file():
        report = _finished(out / "report.json", budget, method, seed)
        if report is not None:
            return report
    if method == "search" and out is not None and (out / "tune").is_dir():
        from .search import search
        keep = ("finetune_epochs", "lr", "distill", "calib_images", "bn_batches", "progress", "device")
        return search(model, data, out=out, resume=True, **{k: v for k, v in kw.items() if k in keep}).report
    return prune(model, data, budget, method=method, seed=seed, out=out, **kw).report


def _finished(path: Path, budget: Budget, method: str, seed: int) -> dict | None:
    """The report in ``path`` if it is a finished run of (budget, method, seed); None if it is
    another run's, or unreadable (then one line says so on stderr, and the run is redone)."""
    try:
        report = json.loads(path.read_text())
        row = _row(budget, method, seed, report)  # every field the results table reads...
        if not all(isinstance(row[k], (int, float)) and not isinstance(row[k], bool) for k in FIELDS[3:]):
            raise TypeError("a result is not a number")
        if not all(isinstance(w, list) and len(w) == 2 and all(isinstance(n, int) for n in w) and w[1] > 0
                   for w in report["widths"].values()):  # ...and the width plots
            raise TypeError("widths are not [kept, width] pairs")
        same = (report["method"], report["seed"], report["budget"]["spec"]) == \
            (method, seed, str(budget))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError):
        print(f"{Path(path.parent.parent.name, path.parent.name, path.name)} is unreadable; rerunning",
              file=sys.stderr)
        return None
    return report if same else None


def _slug(budget: "Budget | str") -> str:
    return str(budget).replace("<=", "-").replace("%", "pct")


def _row(budget: Budget, method: str, seed: int, report: dict) -> dict:
    pruned, base = report["pruned"], report["base"]
    return {"budget": str(budget), "method": method, "seed": seed,
            "accuracy": pruned["accuracy"], "accuracy_adaptive_bn": pruned["accuracy_adaptive_bn"],
            "flops": pruned["flops"], "params": pruned["params"],
            "flops_ratio": pruned["flops"] / base["flops"], "latency_ms": pruned["latency_ms"],
            "elapsed_s": report["elapsed_s"]}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds per (budget, method)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    out = []
    for (budget, method), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        out.append({"budget": budget, "method": method, "n": len(rs),
                    "accuracy_mean": statistics.fmean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "flops": max(r["flops"] for r in rs), "params": max(r["params"] for r in rs),
                    "flops_ratio": max(r["flops_ratio"] for r in rs),
                    "latency_ms": statistics.median(r["latency_ms"] for r in rs)})
    return out


def markdown(summary: list[dict]) -> str:
    """The summary as a markdown table (accuracy as mean ± std in percent)."""
    lines = ["| budget | method | accuracy % (mean ± std) | seeds | FLOPs | params | latency ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in summary:
        lines.append(f"| {s['budget']} | {s['method']} | {100 * s['accuracy_mean']:.2f} ± "
                     f"{100 * s['accuracy_std']:.2f} | {s['n']} | {s['flops'] / 1e6:.2f}M "
                     f"({s['flops_ratio']:.1%}) | {s['params'] / 1e3:.1f}K | {s['latency_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, results: dict) -> None:
    """results.json, results.csv, results.md and the plots, each written atomically."""
    from .report import plot_accuracy_vs_flops, plot_width_comparison
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in FIELDS} for r in results["rows"])
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown(results["summary"]))
    plot_accuracy_vs_flops(results["summary"], out / "accuracy_vs_flops.png")
    seed = results["settings"]["seeds"][-1]  # ``widths`` holds each method's last-seed structure
    for budget, per_method in results["widths"].items():
        plot_width_comparison(per_method, out / f"widths_{_slug(budget)}.png", title=f"{budget}, seed {seed}")


def proxy_fidelity(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%", n: int = 12,
                   space: "str | SearchSpace" = "generic", finetune_epochs: int = 5, seed: int = 0,
                   calib_images: int = 512, progress: bool = False) -> dict:
    """Kendall τ between the search's proxy scores and accuracy after the full fine-tune.

    ``n`` structures drawn at random from the search space ``space`` (Optuna's
    RandomSampler; fitted to ``budget`` as in a search) are scored three ways: the
    search's proxy without fine-tuning (adaptive BN only), the search's proxy as
    configured (adaptive BN + ``proxy.finetune_steps`` SGD steps), both on the same
    validation batches, and test accuracy after adaptive BN and ``finetune_epochs``.
    """
    import optuna

    from .search import load
    from .search.runner import driver_state
    from .search.space import Section
    from .search.trial import Shared, build_structure, evaluate_candidate

    spec = space if isinstance(space, SearchSpace) else load(space)
    budget = Budget.parse(budget)
    device = evaluate.default_device()
    model = model.to(device).eval()
    units, scores, labels = driver_state(model, data, spec, budget, seed, calib_images, progress, device)
    shared = Shared(model, units, spec, budget, scores, labels, data, seed)
    bn_only = replace(shared, spec=replace(spec, proxy=Section({**spec.proxy, "finetune_steps": 0})))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    define, rows = spec.define(units), []
    for i in range(n):
        trial = study.ask()
        define(trial)
        _, small, _, flops, _ = build_structure(shared, spec.candidate(trial.params, units))
        evaluate.adaptive_bn(small, data.train, n_batches=int(spec.proxy.bn_batches), seed=seed)
        evaluate.finetune(small, data, finetune_epochs, seed=seed, progress=progress)
        rows.append({"candidate": i, "flops": flops,
                     "adaptive_bn": evaluate_candidate(bn_only, trial.params)["proxy_score"],
                     "proxy_finetune": evaluate_candidate(shared, trial.params)["proxy_score"],
                     "final": evaluate.accuracy(small.eval(), data.test)})
    final = [r["final"] for r in rows]
    return {"budget": str(budget), "n": n, "space": spec.name, "proxy": dict(spec.proxy),
            "finetune_epochs": finetune_epochs, "candidates": rows,
            "kendall_tau_adaptive_bn": float(kendalltau([r["adaptive_bn"] for r in rows], final)[0]),
            "kendall_tau_proxy_finetune": float(kendalltau([r["proxy_finetune"] for r in rows], final)[0])}
