"""Statistics of a comparison over seeds: a mean's t-interval, a paired test, Holm's adjustment.

One cell (an arm at a budget, ``n`` seeds): mean ± sample std and the t-interval
``mean ± t_{(1+c)/2, n-1} · s / √n`` (none for ``n = 1``). Two arms at one budget, over
the seeds both ran (same seed = same calibration images and fine-tune order): the paired
t-test on ``d_i = a_i − b_i`` (``scipy.stats.ttest_rel``), the mean difference with its
t-interval and, for ``n ≥ 6``, Wilcoxon's signed-rank p. p-values are raw (uncorrected);
:func:`holm` gives the Holm–Bonferroni step-down adjustment over a family of tests.
Pure functions of plain numbers (numpy, scipy); undefined values are None, never NaN.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from scipy import stats as sps

from .errors import OptionError, short

__all__ = ["CONFIDENCE", "WILCOXON_MIN_N", "holm", "interval", "paired"]

CONFIDENCE = 0.95
WILCOXON_MIN_N = 6
"""Wilcoxon's signed-rank test is reported from this many pairs on (with fewer, its
smallest attainable two-sided p, 2/2^n, cannot reach 0.05)."""


def _values(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise OptionError(f"{what} must be a non-empty list of finite numbers, got {short(values)}")
    return x


def _check_confidence(confidence: float) -> None:
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise OptionError(f"confidence must be a number in (0, 1), like 0.95; got {short(confidence)}")


def _half_width(std: float, n: int, confidence: float) -> float:
    return float(sps.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n))


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """``n``, ``mean``, ``std`` (sample std, ``ddof=1``; 0 for one value) and the
    t-interval of the mean, ``low``/``high`` (None for ``n = 1``: one value gives no interval).

    >>> interval([0.9, 0.8, 0.85])["low"]   # 0.85 - t(0.975, 2) * 0.05 / sqrt(3)
    """
    _check_confidence(confidence)
    x = _values(values, "values")
    n, mean = int(x.size), float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    low = high = None
    if n > 1:
        half = _half_width(std, n, confidence)
        low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "std": std, "low": low, "high": high, "confidence": confidence}


def paired(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """Paired comparison of ``a`` and ``b`` (``a[i]`` and ``b[i]`` from the same seed).

    ``n``; ``mean_diff`` (mean of ``a − b``) with its t-interval ``diff_low``/``diff_high``
    (None for ``n = 1``); ``p``: two-sided paired t-test (``scipy.stats.ttest_rel``), None
    when undefined (``n = 1``, or every difference 0); ``p_wilcoxon``: two-sided signed-rank
    test for ``n ≥`` :data:`WILCOXON_MIN_N`, else None (also None when every difference is 0).
    Every difference equal but not 0 gives ``p = 0`` (scipy's answer: no variance to doubt it).
    """
    _check_confidence(confidence)
    x, y = _values(a, "a"), _values(b, "b")
    if x.size != y.size:
        raise OptionError(f"paired values must pair up (one of each per seed), got {x.size} and {y.size}")
    d = x - y
    spread = interval(d, confidence)
    out = {"n": int(d.size), "mean_diff": spread["mean"], "diff_low": spread["low"],
           "diff_high": spread["high"], "p": None, "p_wilcoxon": None, "confidence": confidence}
    if d.size < 2 or not d.any():
        return out
    with warnings.catch_warnings():  # near-equal differences: scipy warns, and answers
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(sps.ttest_rel(x, y).pvalue)
        out["p"] = p if math.isfinite(p) else None
        if d.size >= WILCOXON_MIN_N:
            w = float(sps.wilcoxon(x, y).pvalue)
            out["p_wilcoxon"] = w if math.isfinite(w) else None
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values, in the input's order: the i-th smallest of ``m``
    raw p-values becomes ``max_{j ≤ i} min(1, (m − j + 1) · p_(j))``. None entries (tests
    that are undefined) stay None and are not counted in ``m``.

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    present = [i for i, p in enumerate(pvalues) if p is not None]
    for i in present:
        p = pvalues[i]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise OptionError(f"p-values must be numbers in [0, 1] (or None), got {short(p)}")
    m = len(present)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(present, key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * float(pvalues[i])))
        out[i] = running
    return out
