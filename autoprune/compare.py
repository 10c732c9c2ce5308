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
import random
import statistics
from pathlib import Path
from typing import Sequence

import torch
from scipy.stats import kendalltau
from torch import nn

from . import evaluate
from .budget import Budget
from .checkpoint import atomic_write_text
from .data import DataBundle
from .plan import select
from .prune import prune
from .space import Space

DEFAULT_METHODS = ("uniform", "greedy", "wsp", "tp_global", "search")
FIELDS = ("budget", "method", "seed", "accuracy", "accuracy_adaptive_bn", "flops", "params",
          "flops_ratio", "latency_ms", "elapsed_s")


def compare(model: nn.Module, data: DataBundle, budgets: Sequence[str] = ("flops<=70%", "flops<=50%", "flops<=30%"),
            methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] = (0, 1, 2),
            finetune_epochs: int = 5, criterion: str | None = None, out: str | Path | None = None,
            progress: bool = True, **prune_kw) -> dict:
    """Run every method at every budget for every seed; write and return the results.

    ``prune_kw`` go to :func:`autoprune.prune` (e.g. ``space=``, ``trials=`` for search).
    """
    rows, widths = [], {}
    for budget in budgets:
        for method in methods:
            for seed in seeds:
                kw = dict(prune_kw)
                if method != "search":
                    kw = {k: v for k, v in kw.items() if k not in ("space", "trials", "workers", "address")}
                run_out = Path(out) / "runs" / f"{_slug(budget)}-{method}-s{seed}" if out else None
                result = prune(model, data, budget, method=method, criterion=criterion, seed=seed,
                               finetune_epochs=finetune_epochs, out=run_out, progress=progress, **kw)
                rows.append(_row(budget, method, seed, result.report))
                widths.setdefault(budget, {})[method] = result.report["widths"]
    summary = summarise(rows)
    results = {"rows": rows, "summary": summary, "widths": widths,
               "settings": {"budgets": list(budgets), "methods": list(methods), "seeds": list(seeds),
                            "finetune_epochs": finetune_epochs, "criterion": criterion,
                            "data": data.name}}
    if out is not None:
        write_results(Path(out), results)
    return results


def _slug(budget: str) -> str:
    return str(Budget.parse(budget)).replace("<=", "-").replace("%", "pct")


def _row(budget: str, method: str, seed: int, report: dict) -> dict:
    pruned, base = report["pruned"], report["base"]
    return {"budget": str(Budget.parse(budget)), "method": method, "seed": seed,
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
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows({k: r[k] for k in FIELDS} for r in results["rows"])
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", markdown(results["summary"]))
    plot_accuracy_vs_flops(results["summary"], out / "accuracy_vs_flops.png")
    for budget, per_method in results["widths"].items():
        plot_width_comparison(per_method, out / f"widths_{_slug(budget)}.png", title=budget)


def proxy_fidelity(model: nn.Module, data: DataBundle, budget: str = "flops<=50%", n: int = 12,
                   bn_batches: int = 20, proxy_steps: int = 50, finetune_epochs: int = 5,
                   seed: int = 0, progress: bool = False) -> dict:
    """Kendall τ between proxy scores and accuracy after the full fine-tune.

    ``n`` random structures (random per-unit ratios fitted to ``budget``, L1 selection)
    are scored three ways: accuracy after adaptive BN only, after adaptive BN and
    ``proxy_steps`` SGD steps (the search's proxy), and after ``finetune_epochs``.
    """
    rng = random.Random(seed)
    model = model.eval()
    space = Space(model, torch.zeros(1, *data.input_shape))
    rows = []
    for i in range(n):
        ratios = {u.name: rng.uniform(0.0, 0.8) for u in space.units}
        small = select(space, space.fit(ratios, budget)).apply(model)
        evaluate.adaptive_bn(small, data.train, n_batches=bn_batches, seed=seed)
        bn = evaluate.accuracy(small, data.val)
        evaluate.proxy_finetune(small, data, steps=proxy_steps, seed=seed)
        proxy = evaluate.accuracy(small.eval(), data.val)
        evaluate.finetune(small, data, finetune_epochs, seed=seed, progress=progress)
        rows.append({"candidate": i, "adaptive_bn": bn, "proxy_finetune": proxy,
                     "final": evaluate.accuracy(small.eval(), data.test)})
    final = [r["final"] for r in rows]
    return {"budget": budget, "n": n, "bn_batches": bn_batches, "proxy_steps": proxy_steps,
            "finetune_epochs": finetune_epochs, "candidates": rows,
            "kendall_tau_adaptive_bn": float(kendalltau([r["adaptive_bn"] for r in rows], final)[0]),
            "kendall_tau_proxy_finetune": float(kendalltau([r["proxy_finetune"] for r in rows], final)[0])}
