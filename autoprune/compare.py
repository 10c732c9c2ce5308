"""Side-by-side comparison of width methods at several budgets, with statistics and compute,
and proxy fidelity.

Every arm (a registered method: the width methods, ``search`` and its arms ``random`` and
``search_widths``, :mod:`autoprune.methods.search_arms`) gets the same baseline, calibration
data, fine-tune recipe and seeds (same seed = same calibration images and fine-tune order).
Per budget and arm: accuracy as mean ± std over seeds with its 95% t-interval, and a paired
t-test of the reference arm (``search``) against every other arm over the seeds both ran
(:mod:`autoprune.stats`: mean difference with its interval, raw and Holm-adjusted p), beside
what each run spent (``report["compute"]``: wall time, proxy evaluations, full fine-tunes,
the method's own time ÷ the fine-tune's). Written as results.csv/json/md and plotted
(accuracy vs FLOPs per arm; per-unit widths of greedy vs searched structures).

A finished run in ``out/runs`` is reused only when its ``report["settings"]`` equal this
run's (:func:`autoprune.prune.prune_settings`: data and splits, baseline digest, budget,
method, options, fine-tune, trials and search-space digest, seed, autoprune's version);
otherwise it is redone and one line on stderr names what changed.
``proxy_fidelity`` measures how far the search's cheap proxy can be trusted:
Kendall τ between proxy scores and accuracy after the full fine-tune.
"""

from __future__ import annotations

import csv
import io
import shutil
import statistics
import sys
from pathlib import Path
from typing import Mapping, Sequence

from torch import nn

from . import methods as width_methods
from .budget import Budget
from .checkpoint import atomic_write_text, write_json
from .data import DataBundle
from .differences import differences, flat, plain
from .errors import AutopruneError, BudgetError, OptionError, short
from .pipeline import check_options as check_prune_options
from .prune import METHOD_ONLY, SEARCH_ONLY, prune, prune_settings, search_run
from .search.space import SearchSpace
from .fidelity import proxy_fidelity  # noqa: F401 - re-exported (moved to autoprune.fidelity)
from .json_file import read_json
from .stats import CONFIDENCE, holm, interval, paired

DEFAULT_METHODS = width_methods.available()
"""Every registered method, in registration order (the search and its arms included)."""
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
"""Five seeds per cell by default: enough for a t-interval and a paired test with some power."""
REFERENCE = "search"
"""The arm every other arm is tested against (paired over seeds) at each budget."""
FIELDS = ("budget", "method", "seed", "accuracy", "accuracy_adaptive_bn", "flops", "params",
          "flops_ratio", "latency_ms", "elapsed_s",
          "proxy_evaluations", "finetunes", "finetune_s", "method_s", "search_cost")
"""results.csv's columns: one row per run (the first ten as before; then report["compute"])."""
_NUMBERS = ("accuracy", "accuracy_adaptive_bn", "flops", "params", "flops_ratio", "latency_ms", "elapsed_s",
            "finetunes", "finetune_s", "method_s")
_OPTIONAL_NUMBERS = ("proxy_evaluations", "search_cost")  # None: not reported / no fine-tune


METHOD_OPTIONS = ("greedy_mode", "greedy_step", "greedy_bn_batches", "greedy_recalibrate", "greedy_rescore",
                  "greedy_cap", "greedy_finetune_every", "greedy_finetune_steps", "greedy_screen",
                  "wsp_variant", "sg_k", "fastnas_batches", "fastnas_divisor")
"""prune() keywords that are a width method's options, checked with the methods up front."""


def check_options(methods: Sequence[str], criterion: "str | dict | None" = None,
                  space: "str | SearchSpace | None" = None, what: str = "methods",
                  **method_options) -> list[str]:
    """The methods, after checking each (and the criterion and ``method_options`` — e.g.
    ``greedy_step`` — for every width method, and the search space when a search run is among
    them): AutopruneError naming the choices. Cheap, so :func:`compare` and the CLI run it
    before any training, calibration or pruning."""
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
    searches = [m for m in methods if search_run(m) is not None]
    for method in (m for m in methods if m not in searches):
        if width_methods.get(method).available() is None:
            check_prune_options(method, criterion, **method_options)
        else:  # one not installed (fastnas without its extra) is skipped by compare: its values only
            width_methods.get(method).check(method_options)
    if searches and space is not None and not isinstance(space, SearchSpace):
        from .search import load
        load(space)
    return methods


def _check_seeds(seeds: Sequence[int]) -> list[int]:
    ok = (not isinstance(seeds, (str, bytes)) and isinstance(seeds, Sequence) and len(seeds) > 0
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
          and len(set(seeds)) == len(seeds))
    if not ok:
        raise OptionError(f"seeds must be a non-empty list of distinct integers >= 0, like (0, 1, 2, 3, 4); "
                          f"got {short(seeds)}")
    return list(seeds)


def compare(model: nn.Module, data: DataBundle,
            budgets: "Sequence[str | Budget]" = ("flops<=70%", "flops<=50%", "flops<=30%"),
            methods: Sequence[str] = DEFAULT_METHODS, seeds: Sequence[int] = DEFAULT_SEEDS,
            finetune_epochs: int = 5, criterion: str | None = None, out: str | Path | None = None,
            progress: bool = True, reference: str = REFERENCE, **prune_kw) -> dict:
    """Run every method at every budget for every seed; write and return the results.

    ``prune_kw`` go to :func:`autoprune.prune` (e.g. ``space=``, ``trials=``, ``workers=`` for
    the search and its arms, which share them). ``reference`` is the arm the others are
    tested against (paired over seeds); when it is not among ``methods`` there are no tests
    (results.md says so). Every option is checked (:func:`check_options`, the seeds, each
    budget parsed once, here) before any run. Returns ``rows`` (one per run), ``summary``
    (one per budget and arm), ``tests`` (one per budget and arm other than ``reference``),
    ``widths`` and ``settings``.
    """
    methods = check_options(methods, criterion, prune_kw.get("space"),
                            **{k: v for k, v in prune_kw.items() if k in METHOD_OPTIONS})
    seeds = _check_seeds(seeds)
    if not isinstance(reference, str):
        raise OptionError(f"reference must be a method name, got {short(reference)}")
    budgets = [Budget.parse(b) for b in budgets]
    skipped = {m: reason for m in methods if (reason := width_methods.get(m).available())}
    for method, reason in skipped.items():
        print(f"compare: skipping {method}: {reason}", file=sys.stderr)
    rows, widths, unreached = [], {}, []
    for budget in budgets:
        for method in (m for m in methods if m not in skipped):
            for seed in seeds:
                kw = dict(prune_kw)
                if search_run(method) is None:
                    kw = {k: v for k, v in kw.items() if k not in (*SEARCH_ONLY, "address")}
                run_out = Path(out) / "runs" / f"{_slug(budget)}-{method}-s{seed}" if out else None
                try:
                    report = _run(model, data, budget, method, seed, run_out, criterion=criterion,
                                  finetune_epochs=finetune_epochs, progress=progress, **kw)
                except KeyboardInterrupt:
                    raise KeyboardInterrupt("compare stopped; run the same command again to continue "
                                            "(finished runs are reused)" if out else "") from None
                except BudgetError as error:  # the arm cannot reach this budget: a finding, not a crash
                    print(f"compare: {method} cannot reach {budget} (seed {seed}): {error}", file=sys.stderr)
                    unreached.append({"budget": str(budget), "method": method, "seed": seed,
                                      "reason": str(error)})
                    continue
                rows.append(_row(budget, method, seed, report))
                widths.setdefault(str(budget), {})[method] = report["widths"]
    results = {"rows": rows, "summary": summarise(rows), "tests": paired_tests(rows, reference),
               "widths": widths, "skipped": skipped, "unreached": unreached,
               "settings": {"budgets": [str(b) for b in budgets], "methods": list(methods), "seeds": seeds,
                            "finetune_epochs": finetune_epochs, "criterion": criterion,
                            "data": data.name, "reference": reference, "confidence": CONFIDENCE}}
    if out is not None:
        write_results(Path(out), results)
    return results


# --------------------------------------------------------------------------- one run, reused if finished


def _run(model: nn.Module, data: DataBundle, budget: Budget, method: str, seed: int, out: Path | None,
         **kw) -> dict:
    """One method's report at one budget and seed. A run finished in ``out`` with the same
    settings is reused, and an interrupted search run there with the same recorded settings
    is resumed, so an interrupted compare loses nothing; one with other settings is redone."""
    if out is None:
        return prune(model, data, budget, method=method, seed=seed, out=out, **kw).report
    expected = plain(prune_settings(model, data, budget, method, seed=seed, **kw))
    if (out / "report.json").is_file():
        report = _finished(out / "report.json", budget, method, seed, expected)
        if report is not None:
            return report
    if search_run(method) is not None and (out / "tune").is_dir():
        from .search import search
        from .search.runner import SETTINGS_FILE, TUNE_DIR
        changed = _resume_differences(out, expected)
        if not changed:
            keep = ("finetune_epochs", "lr", "distill", "calib_images", "bn_batches", "progress", "device")
            return search(model, data, out=out, resume=True, **{k: v for k, v in kw.items() if k in keep}).report
        print(f"{_name(out)}: starting its search again ({changed}); the interrupted one is discarded",
              file=sys.stderr)
        shutil.rmtree(out / TUNE_DIR)
        (out / SETTINGS_FILE).unlink(missing_ok=True)
    return prune(model, data, budget, method=method, seed=seed, out=out, **kw).report


def _name(out: Path) -> str:
    return str(Path(out.parent.name, out.name))


def _finished(path: Path, budget: Budget, method: str, seed: int, expected: Mapping) -> dict | None:
    """The report in ``path`` if it is a finished run with settings ``expected``; None if its
    settings differ (one line on stderr names the differences), or it is unreadable (one line
    says so); the run is then redone."""
    name = _name(path.parent)
    try:
        report = read_json(path)
        recorded = report.get("settings")
        if not isinstance(recorded, dict):
            print(f"{name}: rerunning (its report records no settings: an older run)", file=sys.stderr)
            return None
        changed = differences(_own_options(recorded, method), expected)
        if changed:
            print(f"{name}: rerunning ({changed})", file=sys.stderr)
            return None
        row = _row(budget, method, seed, report)  # every field the results table reads...
        if not all(_is_number(row[k]) for k in _NUMBERS) or \
                not all(row[k] is None or _is_number(row[k]) for k in _OPTIONAL_NUMBERS):
            raise TypeError("a result is not a number")
        if not all(isinstance(w, list) and len(w) == 2 and all(isinstance(n, int) for n in w) and w[1] > 0
                   for w in report["widths"].values()):  # ...and the width plots
            raise TypeError("widths are not [kept, width] pairs")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError, RecursionError):
        print(f"{name}/{path.name} is unreadable; rerunning", file=sys.stderr)
        return None
    return report


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _own_options(recorded: Mapping, method: str) -> Mapping:
    """``recorded`` settings without options that belong to another method
    (:data:`autoprune.prune.METHOD_ONLY`): earlier versions recorded the greedy's options in
    every width method's settings, where they had no effect, so they do not make a run stale."""
    options = recorded.get("options")
    if not isinstance(options, Mapping):
        return recorded
    return {**recorded, "options": {k: v for k, v in options.items() if METHOD_ONLY.get(k, method) == method}}


def _resume_differences(out: Path, expected: Mapping) -> str:
    """What the interrupted search in ``out`` recorded (search.json, space.yaml) that differs
    from ``expected`` (settings a resume would not change); empty if it can be resumed."""
    from .search import load
    from .search.runner import SPACE_FILE, read_settings, space_digest

    try:
        saved = read_settings(out)
        digest = space_digest(load(out / SPACE_FILE))
    except AutopruneError as exc:
        return f"its recorded settings are unreadable: {short(str(exc), 80)}"
    b = saved["budget"]
    recorded = {"budget": {"kind": b.kind, "value": b.value, "relative": b.relative},
                "method": saved.get("method") or "search", "seed": saved["seed"],
                "options": {"space": digest, "trials": saved["trials"], "workers": saved["workers"]}}
    return differences(plain(recorded), expected, keys=list(flat(recorded)))


def _slug(budget: "Budget | str") -> str:
    return str(budget).replace("<=", "-").replace("%", "pct")


def _row(budget: Budget, method: str, seed: int, report: dict) -> dict:
    pruned, base, compute = report["pruned"], report["base"], report["compute"]
    return {"budget": str(budget), "method": method, "seed": seed,
            "accuracy": pruned["accuracy"], "accuracy_adaptive_bn": pruned["accuracy_adaptive_bn"],
            "flops": pruned["flops"], "params": pruned["params"],
            "flops_ratio": pruned["flops"] / base["flops"], "latency_ms": pruned["latency_ms"],
            "elapsed_s": report["elapsed_s"],
            **{k: compute[k] for k in ("proxy_evaluations", "finetunes", "finetune_s", "method_s", "search_cost")}}


# --------------------------------------------------------------------------- statistics


def _mean(values: list) -> float | None:
    """The mean, or None if any value is None (not reported)."""
    return None if any(v is None for v in values) else statistics.fmean(values)


def summarise(rows: list[dict], confidence: float = CONFIDENCE) -> list[dict]:
    """Per (budget, method): accuracy mean, std and t-interval over seeds
    (``accuracy_ci_low``/``_high``, None for one seed), the largest realized cost, the median
    latency, and the mean wall time, proxy evaluations, fine-tunes, fine-tune time, method
    time and search cost (None where a run did not report it)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], r["method"]), []).append(r)
    out = []
    for (budget, method), rs in groups.items():
        acc = interval([r["accuracy"] for r in rs], confidence)
        out.append({"budget": budget, "method": method, "n": acc["n"],
                    "accuracy_mean": acc["mean"], "accuracy_std": acc["std"],
                    "accuracy_ci_low": acc["low"], "accuracy_ci_high": acc["high"], "confidence": confidence,
                    "flops": max(r["flops"] for r in rs), "params": max(r["params"] for r in rs),
                    "flops_ratio": max(r["flops_ratio"] for r in rs),
                    "latency_ms": statistics.median(r["latency_ms"] for r in rs),
                    **{k: _mean([r.get(k) for r in rs]) for k in ("elapsed_s", "proxy_evaluations", "finetunes",
                                                                  "finetune_s", "method_s", "search_cost")}})
    return out


def paired_tests(rows: list[dict], reference: str = REFERENCE, confidence: float = CONFIDENCE) -> list[dict]:
    """At each budget, ``reference`` against every other arm, paired over the seeds both ran
    (:func:`autoprune.stats.paired` on test accuracy, ``reference − arm``): ``n``, ``seeds``,
    ``mean_diff`` with ``diff_low``/``diff_high``, ``p`` (paired t-test, raw), ``p_holm``
    (Holm-adjusted over the tests at its budget: one family per budget, the question "is the
    reference better than the others at this budget"), ``p_wilcoxon`` (n ≥ 6). None where
    undefined. Empty when ``reference`` ran at no budget."""
    acc = {(r["budget"], r["method"], r["seed"]): r["accuracy"] for r in rows}
    tests = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        ref_seeds = [r["seed"] for r in rows if r["budget"] == budget and r["method"] == reference]
        for method in dict.fromkeys(r["method"] for r in rows if r["budget"] == budget):
            seeds = [s for s in ref_seeds if (budget, method, s) in acc]
            if method == reference or not seeds:
                continue
            test = paired([acc[(budget, reference, s)] for s in seeds], [acc[(budget, method, s)] for s in seeds],
                          confidence)
            tests.append({"budget": budget, "reference": reference, "method": method, "seeds": seeds, **test})
    for budget in dict.fromkeys(t["budget"] for t in tests):
        family = [t for t in tests if t["budget"] == budget]
        for test, adjusted in zip(family, holm([t["p"] for t in family])):
            test["p_holm"] = adjusted
    return tests


# --------------------------------------------------------------------------- tables and files


def _family(tests: list[dict]) -> str:
    """The Holm family of :func:`paired_tests`, in words: the comparisons with a defined p at
    each budget (:func:`autoprune.stats.holm` leaves undefined ones out of the count)."""
    sizes = {t["budget"]: 0 for t in tests}
    for t in tests:
        sizes[t["budget"]] += t["p"] is not None
    if len(sizes) == 1:
        return f"the {sizes.popitem()[1]} comparisons with a p-value in this file"
    counts = set(sizes.values())
    each = f"the {counts.pop()} comparisons" if len(counts) == 1 else "the comparisons"
    return f"{each} at each budget separately (one family per budget)"


def _pct(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _num(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _p(x: float | None) -> str:
    return "—" if x is None else (f"{x:.2g}" if x < 0.001 else f"{x:.3f}")


def markdown(summary: list[dict], tests: "list[dict] | None" = None, reference: str = REFERENCE,
             skipped: "Mapping[str, str] | None" = None, unreached: "list[dict] | None" = None) -> str:
    """The summary as markdown, one table per budget: arm, accuracy (mean ± std, %), its 95%
    interval, n, FLOPs (realized ratio), params, latency, wall time, proxy evaluations, full
    fine-tunes and their wall time, search cost ÷ fine-tune; with ``tests`` (:func:`paired_tests`) also ``reference − arm`` with its
    interval and the paired p, raw and Holm-adjusted; then notes saying how to read them."""
    with_tests = tests is not None
    wilcoxon = with_tests and any(t.get("p_wilcoxon") is not None for t in tests)
    confidence = summary[0].get("confidence", CONFIDENCE) if summary else CONFIDENCE
    level = f"{100 * confidence:g}%"
    head = ["arm", "accuracy % (mean ± std)", f"{level} CI", "n", "FLOPs (ratio)", "params", "latency ms",
            "wall s", "proxy evals", "fine-tunes", "fine-tune s", "search cost ÷ fine-tune"]
    if with_tests:
        head += [f"{reference} − arm, pp ({level} CI)", "p", "p Holm"] + (["p Wilcoxon"] if wilcoxon else [])
    by_test = {(t["budget"], t["method"]): t for t in tests or ()}
    lines = []
    for budget in dict.fromkeys(s["budget"] for s in summary):
        lines += [f"### {budget}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for s in (s for s in summary if s["budget"] == budget):
            low, high = s.get("accuracy_ci_low"), s.get("accuracy_ci_high")
            cells = [s["method"], f"{_pct(s['accuracy_mean'])} ± {_pct(s['accuracy_std'])}",
                     "none (n = 1)" if low is None else f"[{_pct(low)}, {_pct(high)}]", str(s["n"]),
                     f"{s['flops'] / 1e6:.2f}M ({s['flops_ratio']:.1%})", f"{s['params'] / 1e3:.1f}K",
                     f"{s['latency_ms']:.2f}", _num(s.get("elapsed_s"), ".1f"),
                     _num(s.get("proxy_evaluations"), "g"), _num(s.get("finetunes"), "g"),
                     _num(s.get("finetune_s"), ".1f"), _num(s.get("search_cost"), ".2f")]
            if with_tests:
                t = by_test.get((budget, s["method"]))
                if s["method"] == reference:
                    cells += ["(reference)", "", ""] + ([""] if wilcoxon else [])
                elif t is None:
                    cells += [f"no {reference} run to pair with", "—", "—"] + (["—"] if wilcoxon else [])
                else:
                    ci = "" if t["diff_low"] is None else f" [{_pct(t['diff_low'])}, {_pct(t['diff_high'])}]"
                    cells += [f"{_pct(t['mean_diff'])}{ci}", _p(t["p"]), _p(t["p_holm"])] + \
                        ([_p(t["p_wilcoxon"])] if wilcoxon else [])
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"Accuracy: test accuracy after the final fine-tune, over seeds; {level} CI: the t-interval "
              "of the mean (none for one seed). FLOPs (ratio), params: the largest over the seeds (each run "
              "is bounded by the budget; per seed in results.csv). Latency: the median over the seeds; wall "
              "s, proxy evals, fine-tunes, fine-tune s, search cost: means. wall s: a run's wall time; proxy "
              "evals: candidate structures the method scored (— where the method does not report it); search "
              "cost ÷ fine-tune: the method's own time before the final fine-tune divided by the fine-tune's "
              "(— without one)."]
    if with_tests and tests:
        lines += ["", f"p: two-sided paired t-test of {reference} against the arm over the seeds both ran "
                  "(same seed = same calibration images and fine-tune order); p-values are uncorrected. "
                  f"p Holm: Holm–Bonferroni-adjusted over {_family(tests)}"
                  + ("; p Wilcoxon: signed-rank test (n ≥ 6)." if wilcoxon else ".")
                  + " — : undefined (one seed, or no difference at all)."]
    elif with_tests:
        lines += ["", f"No paired tests: {reference!r} is not among the arms (or ran at no budget)."]
    for method, reason in (skipped or {}).items():
        lines += ["", f"Not run: {method} ({reason})."]
    for u in unreached or ():
        lines += ["", f"No result: {u['method']} cannot reach {u['budget']} (seed {u['seed']}): {u['reason']}"]
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
    atomic_write_text(out / "results.md", markdown(results["summary"], results.get("tests"),
                                                   results["settings"].get("reference", REFERENCE),
                                                   results.get("skipped"), results.get("unreached")))
    plot_accuracy_vs_flops(results["summary"], out / "accuracy_vs_flops.png")
    seed = results["settings"]["seeds"][-1]  # ``widths`` holds each method's last-seed structure
    for budget, per_method in results["widths"].items():
        plot_width_comparison(per_method, out / f"widths_{_slug(budget)}.png", title=f"{budget}, seed {seed}")
