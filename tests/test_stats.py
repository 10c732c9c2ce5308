"""Statistics of a comparison: intervals, paired tests and Holm's adjustment, each recomputed
independently (scipy's own tests, numpy formulas, known answers) on constructed numbers."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from autoprune.compare import markdown, paired_tests, summarise
from autoprune.errors import AutopruneError
from autoprune.stats import holm, interval, paired

SEARCH = [0.912, 0.905, 0.921, 0.899, 0.915, 0.910]
GREEDY = [0.901, 0.903, 0.909, 0.897, 0.902, 0.906]
T_975 = {4: 2.776445105, 5: 2.570581836}  # Student t quantiles t(0.975, df), from tables


def test_interval_is_mean_plus_minus_t_s_over_root_n():
    x = np.array(SEARCH[:5])
    got = interval(x)
    half = T_975[4] * x.std(ddof=1) / math.sqrt(5)
    assert got["n"] == 5 and got["mean"] == pytest.approx(x.mean()) and got["std"] == pytest.approx(x.std(ddof=1))
    assert (got["low"], got["high"]) == (pytest.approx(x.mean() - half), pytest.approx(x.mean() + half))


def test_one_value_has_no_interval_and_the_table_says_so():
    got = interval([0.9])
    assert got["std"] == 0.0 and got["low"] is None and got["high"] is None
    rows = [{"budget": "flops<=50%", "method": "greedy", "seed": 0, "accuracy": 0.9, "flops": 50, "params": 5,
             "flops_ratio": 0.5, "latency_ms": 1.0, "elapsed_s": 2.0, "proxy_evaluations": 0, "finetunes": 1,
             "finetune_s": 1.0, "method_s": 0.5, "search_cost": 0.5}]
    table = markdown(summarise(rows), paired_tests(rows))
    assert "| greedy | 90.00 ± 0.00 | none (n = 1) | 1 |" in table
    assert "nan" not in table.lower() and "No paired tests: 'search' is not among the arms" in table


def test_paired_p_and_difference_interval_equal_scipy_and_numpy():
    got = paired(SEARCH, GREEDY)
    d = np.array(SEARCH) - np.array(GREEDY)
    half = T_975[5] * d.std(ddof=1) / math.sqrt(6)
    assert got["n"] == 6
    assert got["p"] == pytest.approx(sps.ttest_rel(SEARCH, GREEDY).pvalue, rel=1e-12)
    assert got["mean_diff"] == pytest.approx(d.mean())
    assert (got["diff_low"], got["diff_high"]) == (pytest.approx(d.mean() - half), pytest.approx(d.mean() + half))
    assert got["p_wilcoxon"] == pytest.approx(sps.wilcoxon(SEARCH, GREEDY).pvalue)
    assert paired(SEARCH[:5], GREEDY[:5])["p_wilcoxon"] is None  # below 6 pairs


def test_paired_undefined_cases_are_none_not_nan():
    same = paired([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert same["p"] is None and same["mean_diff"] == 0.0
    one = paired([0.9], [0.8])
    assert one["p"] is None and one["diff_low"] is None and one["mean_diff"] == pytest.approx(0.1)
    with pytest.raises(AutopruneError, match="pair up"):
        paired([0.9, 0.8], [0.9])


def test_holm_known_answers():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, None, 0.02]) == [pytest.approx(0.5), None, pytest.approx(0.04)]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1, then monotone
    assert holm([]) == []


def test_paired_tests_pair_by_seed_and_holm_over_every_test():
    """Rows in any order, one greedy seed missing: the test pairs the seeds both arms ran."""
    rows = []
    for method, accs in (("search", SEARCH), ("greedy", GREEDY), ("uniform", [a - 0.02 for a in GREEDY])):
        rows += [{"budget": "flops<=50%", "method": method, "seed": s, "accuracy": a}
                 for s, a in enumerate(accs) if not (method == "greedy" and s == 2)]
    rows.reverse()
    tests = paired_tests(rows)
    assert [t["method"] for t in tests] == ["uniform", "greedy"]
    greedy = tests[1]
    keep = [s for s in range(6) if s != 2]
    assert greedy["seeds"] == sorted(keep, reverse=True) and greedy["n"] == 5
    expected = sps.ttest_rel([SEARCH[s] for s in greedy["seeds"]], [GREEDY[s] for s in greedy["seeds"]]).pvalue
    assert greedy["p"] == pytest.approx(expected, rel=1e-12)
    low, high = sorted(t["p"] for t in tests)  # two tests: 2·p_(1), then max(that, p_(2))
    adjusted = {low: min(1.0, 2 * low), high: max(min(1.0, 2 * low), high)}
    assert [t["p_holm"] for t in tests] == pytest.approx([adjusted[t["p"]] for t in tests])


def test_holm_is_one_family_per_budget():
    """Two budgets, three arms each: each budget's p are adjusted among themselves only."""
    rng = np.random.default_rng(3)
    rows = []
    for budget in ("flops<=50%", "flops<=30%"):
        for method, shift in (("search", 0.0), ("uniform", 0.01), ("greedy", -0.005), ("wsp", 0.002)):
            rows += [{"budget": budget, "method": method, "seed": s, "accuracy": 0.9 + shift + rng.normal(0, 0.004),
                      "flops": 50, "params": 5, "flops_ratio": 0.5, "latency_ms": 1.0, "elapsed_s": 2.0,
                      "proxy_evaluations": 0, "finetunes": 1, "finetune_s": 1.0, "method_s": 0.5, "search_cost": 0.5}
                     for s in range(5)]
    tests = paired_tests(rows)
    assert len(tests) == 6
    for budget in ("flops<=50%", "flops<=30%"):
        family = [t for t in tests if t["budget"] == budget]
        ps = [t["p"] for t in family]
        m = len(ps)  # Holm by hand: sorted p_(i)·(m − i), running maximum, capped at 1
        order = sorted(range(m), key=lambda i: ps[i])
        expected, running = [0.0] * m, 0.0
        for rank, i in enumerate(order):
            running = max(running, min(1.0, (m - rank) * ps[i]))
            expected[i] = running
        assert [t["p_holm"] for t in family] == pytest.approx(expected)
    table = markdown(summarise(rows), tests)
    assert "Holm–Bonferroni-adjusted over the 3 comparisons at each budget separately" in table
    one = [r for r in rows if r["budget"] == "flops<=50%"]
    assert "over the 3 comparisons with a p-value in this file" in markdown(summarise(one), paired_tests(one))
    tied = [dict(r, method="tied") for r in one if r["method"] == "search"]  # no difference at all: p undefined
    tests = paired_tests(one + tied)
    assert [t["p"] is None for t in tests] == [False, False, False, True]
    assert "over the 3 comparisons with a p-value in this file" in markdown(summarise(one), tests)
