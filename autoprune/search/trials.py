"""The trials table: one plain row per trial, and what the report reads from it.

A row (:func:`trial_row`) comes from a Tune trial's config, last result and error; its
``state`` is one of :data:`STATES`. The table is ordered by trial number with the seeds
marked, and the best trial, the Pareto front and Optuna's importances are read from it.
Plain data only (Optuna is imported inside :func:`rebuild_study`), so
:mod:`autoprune.report` reads it without Ray or torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from ..space import Space
    from .space import SearchSpace

__all__ = ["NUMBER_KEY", "STATES", "best_trial", "flat_config", "importances", "mark_seeds",
           "nested_config", "pareto_front", "rebuild_study", "trial_fields", "trial_row", "trials_table"]

STATES = ("COMPLETE", "PRUNED", "FAIL", "ERROR", "INCOMPLETE")
"""Trial states in the report: COMPLETE (final proxy score), PRUNED (stopped early by ASHA;
its score is from a lower rung), FAIL (proxy fine-tune diverged: PENALTY), ERROR (crashed
after every retry), INCOMPLETE (never finished)."""

NUMBER_KEY = "_number"
"""The Optuna trial number, added to each Tune config by the searcher."""


def flat_config(config: Mapping, prefix: str = "") -> dict:
    """Tune's nested config back to Optuna's flat names (``ratio/layer1``); ``_number`` dropped."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name == NUMBER_KEY:
            continue
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "/"))
        else:
            out[name] = value
    return out


def nested_config(flat: Mapping[str, Any]) -> dict:
    """Optuna's flat names (``ratio/layer1``) as Tune's nested config (the inverse of :func:`flat_config`)."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def trial_row(trial_id: str, config: Mapping, metrics: Mapping | None, error: str | None = None) -> dict:
    """One trials-table entry from a Tune trial's config, last result and error."""
    m = dict(metrics or {})
    if error:
        state = "ERROR"
    elif not m or "proxy_score" not in m:
        state = "INCOMPLETE"
    elif m.get("diverged"):
        state = "FAIL"
    elif m.get("final"):
        state = "COMPLETE"
    else:
        state = "PRUNED"
    number = config.get(NUMBER_KEY, m.get("number"))
    score = m.get("proxy_score")
    return {"number": None if number is None else int(number), "trial_id": trial_id, "state": state,
            "flops": m.get("flops"), "params": m.get("params"),
            "proxy_score": None if score is None else float(score),
            "proxy_steps": m.get("proxy_steps"), "budget_scale": m.get("budget_scale"),
            "node": m.get("node"), "config": flat_config(config),
            "started_at": m.get("started_at"), "time_s": m.get("time_trial_s"),
            "compute_s": m.get("time_compute_s"), "replayed": bool(m.get("replayed", False)),
            "error": error or m.get("error") or None}


def trials_table(rows: Iterable[dict]) -> list[dict]:
    """Rows ordered by trial number (trials without one last, by id)."""
    return sorted(rows, key=lambda r: (r["number"] is None, r["number"] if r["number"] is not None else 0,
                                       r["trial_id"]))


def _same_params(config: Mapping, point: Mapping) -> bool:
    for key, value in point.items():
        have = config.get(key)
        if isinstance(value, float) or isinstance(have, float):
            if have is None or not math.isclose(float(have), float(value), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif have != value:
            return False
    return True


def mark_seeds(rows: list[dict], seeds: Mapping[str, Mapping]) -> list[dict]:
    """Set ``seed_of`` (e.g. "uniform", "greedy") on the trial each enqueued point became.

    The enqueued points are the first trials Optuna hands out, in order, so seed ``i`` is
    the trial numbered ``i`` when its params match (else the lowest-numbered match).
    """
    for i, (name, point) in enumerate(seeds.items()):
        match = [r for r in rows if r["number"] == i and _same_params(r["config"], point)]
        match = match or [r for r in rows if "seed_of" not in r and _same_params(r["config"], point)]
        if match:
            match[0]["seed_of"] = name
    return rows


def best_trial(rows: Sequence[dict]) -> dict | None:
    """The COMPLETE trial with the highest proxy score (ties: fewer FLOPs, then lower number)."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["proxy_score"] is not None]
    if not done:
        return None
    return max(done, key=lambda r: (r["proxy_score"], -(r["flops"] or 0), -(r["number"] or 0)))


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """COMPLETE trials no other beats on both proxy score (higher) and FLOPs (lower)."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["proxy_score"] is not None]
    front = []
    for r in done:
        dominated = any(o["proxy_score"] >= r["proxy_score"] and o["flops"] <= r["flops"]
                        and (o["proxy_score"] > r["proxy_score"] or o["flops"] < r["flops"])
                        for o in done)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["flops"])


def trial_fields(rows: Iterable[dict], seeds: Mapping[str, Mapping]) -> dict:
    """The search part of report.json from raw trial rows: ``trials`` (ordered, seeds marked),
    ``best_trial``, ``seeds`` (each seed's number, state, proxy score, FLOPs, params),
    ``states`` (count per state) and ``nodes`` (distinct node ids)."""
    rows = mark_seeds(trials_table(rows), seeds)
    return {"trials": rows, "best_trial": best_trial(rows),
            "seeds": {name: _brief(next((r for r in rows if r.get("seed_of") == name), None))
                      for name in seeds},
            "states": _count_states(rows), "nodes": sorted({r["node"] for r in rows if r["node"]})}


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: row[k] for k in ("number", "state", "proxy_score", "flops", "params")}


def _count_states(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts


def rebuild_study(rows: Sequence[dict], spec: SearchSpace, space: Space):
    """An in-memory Optuna study holding the COMPLETE trials of the table (for importances).

    Distributions come from replaying the space's define-by-run function on each trial's
    params (``optuna.trial.FixedTrial``).
    """
    import optuna

    names, modes = spec.metrics()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in modes])
    define = spec.define(space)
    for r in rows:
        if r["state"] != "COMPLETE":
            continue
        fixed = optuna.trial.FixedTrial(dict(r["config"]))
        define(fixed)
        values = [float(r[n]) for n in names]
        study.add_trial(optuna.trial.create_trial(params=fixed.params, distributions=fixed.distributions,
                                                  values=values))
    return study


def importances(rows: Sequence[dict], spec: SearchSpace, space: Space,
                seed: int = 0) -> tuple[dict | None, str]:
    """Optuna's fANOVA importances of the params for the proxy score, or None and why not."""
    import optuna

    study = rebuild_study(rows, spec, space)
    if len(study.trials) < 2:
        return None, f"needs at least 2 complete trials, have {len(study.trials)}"
    if not study.trials[0].params:
        return None, "the search space has no variables"
    try:
        result = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            target=lambda t: t.values[0])
    except (RuntimeError, ValueError) as exc:
        return None, f"optuna.importance failed: {exc}"
    return {k: float(v) for k, v in result.items()}, ""
