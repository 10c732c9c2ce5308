"""OptunaSearcher: an Optuna study behind Ray Tune's ``Searcher`` interface.

Optuna proposes (define-by-run ``ask``), Tune runs, and only final scores are told back (a
trial ASHA stopped is PRUNED). The study never leaves the process: the searcher pickles,
saves and restores as plain data, rebuilds the study from it and reconciles it with Tune's
snapshot, so a resumed (or torn) experiment loses no trial and repeats none. Ray is
imported on first use.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .ray_tune import tune_snapshot
from .trials import NUMBER_KEY, flat_config, nested_config

# OptunaSearcher subclasses Ray's Searcher, so it is built on first use by __getattr__ below
__all__ = ["OptunaSearcher", "SEARCHER_FORMAT", "newest_searcher_state", "optuna_search_class",  # noqa: F822
           "read_searcher_state"]

SEARCHER_FORMAT = "autoprune-searcher/1"
SEARCHER_STATE_GLOB = "searcher-state-*.pkl"  # OptunaSearcher.save's files in the experiment, one per session
_FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def _tpe(seed: int | None = None):
    """The default sampler factory (Optuna's TPE)."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def read_searcher_state(path: Path) -> dict | None:
    """A state :meth:`OptunaSearcher.save` wrote, or None if unreadable (torn, another format)."""
    import pickle

    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception:  # noqa: BLE001 - a torn or foreign pickle can raise anything
        return None
    return state if isinstance(state, dict) and state.get("format") == SEARCHER_FORMAT else None


def newest_searcher_state(directory: Path) -> dict | None:
    """The newest readable searcher state Tune kept in ``directory`` (one file per session)."""
    for path in sorted(Path(directory).glob(SEARCHER_STATE_GLOB), reverse=True):
        state = read_searcher_state(path)
        if state is not None:
            return state
    return None


@functools.lru_cache(maxsize=None)
def optuna_search_class():
    """The OptunaSearcher class, defined on first use so that importing autoprune skips Ray."""
    from ray.tune.search import Searcher

    class OptunaSearcher(Searcher):
        """A Ray Tune searcher driving an Optuna study through Optuna's public API only.

        ``space`` is a define-by-run function (``SearchSpace.define``); ``sampler`` a
        picklable factory ``sampler(seed=...)`` returning the Optuna sampler (e.g. the
        bound ``SearchSpace.make_sampler``); ``points_to_evaluate`` are enqueued, in
        order, as the first trials; ``max_trials`` caps the trials handed out (the
        points included), so a resumed search never draws more than requested.

        Each config carries the Optuna trial number (``_number``). Only final scores are
        told: a trial the scheduler stopped before its final rung is told PRUNED; a
        diverged one is told its penalty and tagged user attr ``diverged``; an errored
        one is told FAIL.

        The study (and its sampler, which may hold locks) never leaves the process:
        pickling (Tune's ``tuner.pkl``), :meth:`save` and :meth:`restore` keep plain data
        (the sampler factory and seed, every trial's number, params, distributions,
        state, values and attributes, Tune's trial ids, orphans, the cap and the points),
        and the study is rebuilt from it on first use: finished trials are added with
        ``optuna.trial.create_trial``, running ones asked again with their params
        enqueued, so numbers stay. The rebuilt sampler is seeded with ``seed`` plus the
        number of trials, so it does not repeat the draws it made before.
        """

        def __init__(self, space: Callable, metric: str | list[str], mode: str | list[str],
                     points_to_evaluate: Sequence[Mapping] | None = None,
                     sampler: Callable[..., Any] | None = None, seed: int = 0,
                     max_trials: int | None = None):
            super().__init__(metric=metric, mode=mode)
            if not callable(space):
                raise TypeError("OptunaSearcher: space must be a define-by-run function of an optuna.Trial")
            if sampler is not None and not callable(sampler):
                raise TypeError("OptunaSearcher: sampler must be a factory sampler(seed=...), "
                                "e.g. SearchSpace.make_sampler or optuna.samplers.RandomSampler")
            self.__setstate__({
                "format": SEARCHER_FORMAT, "define": space, "metric": metric, "mode": mode,
                "sampler": sampler or _tpe, "seed": int(seed), "max_trials": max_trials,
                "points": [dict(p) for p in points_to_evaluate or ()], "seeded": 0,
                "trials": [], "ids": {}, "orphans": []})

        # -- plain state

        def __getstate__(self) -> dict:
            return {"format": SEARCHER_FORMAT, "define": self._define, "metric": self._metric,
                    "mode": self._mode, "sampler": self._sampler, "seed": self._seed,
                    "max_trials": self._max_trials, "points": self._points, "seeded": self._seeded,
                    "trials": self._trials, "ids": self._ids, "orphans": self._orphans}

        def __setstate__(self, state: Mapping) -> None:
            if not isinstance(state, Mapping) or state.get("format") != SEARCHER_FORMAT:
                raise ValueError(f"not an {SEARCHER_FORMAT} state")
            self._define, self._metric, self._mode = state["define"], state["metric"], state["mode"]
            self._sampler, self._seed, self._max_trials = state["sampler"], state["seed"], state["max_trials"]
            self._points, self._seeded = copy.deepcopy(list(state["points"])), int(state["seeded"])
            self._trials = copy.deepcopy(list(state["trials"]))  # record i is Optuna trial number i
            self._ids = dict(state["ids"])  # Tune trial id -> number
            self._orphans = list(state["orphans"])  # numbers handed out that Tune does not know
            self._study = None  # rebuilt on first use
            self._live: dict[int, Any] = {}  # number -> optuna.Trial of the running trials

        def save(self, checkpoint_path: str) -> None:
            """Write the plain state (pickle) atomically to ``checkpoint_path``."""
            import pickle

            path = Path(checkpoint_path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(self.__getstate__(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        def restore(self, checkpoint_path: str) -> None:
            """Load a saved state and :meth:`reconcile` it with Tune's snapshot next to it.

            An unreadable file (torn, or another format) gives way to the newest readable
            state in the same folder; with none, this searcher keeps its state and adopts
            every trial Tune recorded.
            """
            path = Path(checkpoint_path)
            state = read_searcher_state(path) or newest_searcher_state(path.parent)
            if state is not None:
                self.__setstate__(state)
            snapshot = tune_snapshot(path.parent)
            if snapshot is not None:
                self.reconcile(snapshot)

        def restart(self, state: Mapping) -> None:
            """Take ``state`` (as :meth:`save` wrote) for a new Tune experiment: Tune's old
            trial ids are forgotten and every trial is handed out again, in number order
            (finished ones keep what Optuna was told)."""
            self.__setstate__(state)
            self._ids, self._orphans = {}, list(range(len(self._trials)))

        # -- the study

        @property
        def study(self):
            """The Optuna study (built, or rebuilt from the plain state, on first use)."""
            if self._study is None:
                self._study = self._rebuild()
            return self._study

        def trial(self, trial_id: str):
            """The Optuna FrozenTrial of Tune trial ``trial_id`` (None if unknown)."""
            number = self._ids.get(trial_id)
            return None if number is None else self.study.get_trials(deepcopy=True)[number]

        def _directions(self) -> list[str]:
            modes = self._mode if isinstance(self._mode, list) else [self._mode]
            return ["maximize" if m == "max" else "minimize" for m in modes]

        def _rebuild(self):
            import optuna
            from optuna.distributions import json_to_distribution
            from optuna.trial import TrialState

            study = optuna.create_study(directions=self._directions(),
                                        sampler=self._sampler(seed=self._seed + len(self._trials)),
                                        pruner=optuna.pruners.NopPruner())
            for rec in self._trials:
                dists = {k: json_to_distribution(v) for k, v in rec["distributions"].items()}
                if rec["state"] in _FINISHED:
                    study.add_trial(optuna.trial.create_trial(
                        state=TrialState[rec["state"]], values=rec["values"], params=rec["params"],
                        distributions=dists, user_attrs=rec["user_attrs"], system_attrs=rec["system_attrs"],
                        intermediate_values=rec["intermediate"]))
                    continue
                study.enqueue_trial(dict(rec["params"]), skip_if_exists=False)
                trial = study.ask(fixed_distributions=dists)
                if trial.number != rec["number"]:
                    raise RuntimeError(f"searcher state out of order: trial {rec['number']} rebuilt as "
                                       f"{trial.number}")
                for step, value in rec["intermediate"].items():
                    trial.report(value, step)
                for key, value in rec["user_attrs"].items():
                    trial.set_user_attr(key, value)
                self._live[trial.number] = trial
            return study

        def _ask(self, params: Mapping | None) -> int:
            """A new Optuna trial (``params`` enqueued first, if given): its number."""
            from optuna.distributions import distribution_to_json

            study = self.study
            if params is not None:
                study.enqueue_trial(dict(params), skip_if_exists=False)
            trial = study.ask()
            self._define(trial)
            if trial.number != len(self._trials):
                raise RuntimeError(f"Optuna numbered a trial {trial.number}, expected {len(self._trials)}")
            self._trials.append({
                "number": trial.number, "params": dict(trial.params),
                "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
                "state": "RUNNING", "values": None, "user_attrs": {}, "system_attrs": {},
                "intermediate": {}})
            self._live[trial.number] = trial
            return trial.number

        def _next_point(self) -> Mapping | None:
            if self._seeded < len(self._points):
                self._seeded += 1
                return self._points[self._seeded - 1]
            return None

        def _config(self, number: int) -> dict:
            return {**nested_config(self._trials[number]["params"]), NUMBER_KEY: number}

        def _tell(self, number: int, values: list | None, state, diverged: bool = False) -> None:
            from optuna.trial import TrialState

            study = self.study  # first: a rebuild fills self._live
            trial = self._live.pop(number)
            if diverged:
                trial.set_user_attr("diverged", True)
            try:
                frozen = study.tell(trial, values, state=state)
            except ValueError:  # values Optuna rejects (NaN): the trial failed
                frozen = study.tell(trial, None, state=TrialState.FAIL)
            self._trials[number].update(
                state=frozen.state.name, values=frozen.values, params=dict(frozen.params),
                user_attrs=dict(frozen.user_attrs), system_attrs=dict(frozen.system_attrs),
                intermediate=dict(frozen.intermediate_values))

        def _finished(self, number: int) -> bool:
            return self._trials[number]["state"] in _FINISHED

        # -- Ray Tune's Searcher interface

        def suggest(self, trial_id: str):
            if trial_id not in self._ids:
                if self._orphans:  # drawn before, unknown to Tune's experiment: hand it out again
                    number = self._orphans.pop(0)
                elif self._max_trials is not None and len(self._trials) >= self._max_trials:
                    return Searcher.FINISHED
                else:
                    number = self._ask(self._next_point())
                self._ids[trial_id] = number
            return self._config(self._ids[trial_id])

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            number = self._ids.get(trial_id)
            if number is None or self._finished(number) or isinstance(self._metric, list):
                return  # Optuna keeps intermediate values for single-objective studies only
            value, step = result.get(self._metric), result.get("training_iteration")
            rec = self._trials[number]
            if value is None or step is None or int(step) in rec["intermediate"]:
                return
            _ = self.study  # first: a rebuild fills self._live
            self._live[number].report(float(value), int(step))
            rec["intermediate"][int(step)] = float(value)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            from optuna.trial import TrialState

            number = self._ids.get(trial_id)
            if number is None or self._finished(number):
                return
            metrics = self._metric if isinstance(self._metric, list) else [self._metric]
            values = None
            if result and not error and result.get("final"):  # not final: stopped early (PRUNED)
                values = [result.get(m) for m in metrics]
                values = None if any(v is None for v in values) else [float(v) for v in values]
            state = (TrialState.COMPLETE if values is not None
                     else TrialState.FAIL if error else TrialState.PRUNED)
            self._tell(number, values, state, diverged=bool(values and result.get("diverged")))

        def reconcile(self, trials: Mapping[str, Mapping]) -> None:
            """Align this (restored) searcher with Tune's trial snapshot ``trials``.

            Tune writes its trial snapshot and the searcher's one after the other, so a
            killed driver can leave either a moment older. Trials Tune knows but the
            searcher does not are adopted under their own params (numbers follow on; a
            pending seed point counts as drawn); trials Tune finished are told their last
            result; trials the searcher handed out but Tune never recorded are orphans,
            handed out again by :meth:`suggest`.
            """
            ordered = sorted(trials.items(), key=lambda kv: kv[1]["config"].get(NUMBER_KEY, math.inf))
            for trial_id, trial in ordered:
                if trial_id not in self._ids:
                    self._next_point()  # the seeds are the first trials: this one took the next
                    self._ids[trial_id] = self._ask(flat_config(trial["config"]))
                if trial["status"] in ("TERMINATED", "ERROR"):
                    self.on_trial_complete(trial_id, trial["last_result"] or None,
                                           error=trial["status"] == "ERROR")
            unknown = [t for t, n in self._ids.items() if t not in trials and not self._finished(n)]
            self._orphans = sorted(set(self._orphans) | {self._ids.pop(t) for t in unknown})

    OptunaSearcher.__module__ = __name__
    OptunaSearcher.__qualname__ = "OptunaSearcher"  # pickled by reference, through __getattr__ below
    return OptunaSearcher


def __getattr__(name: str):
    if name == "OptunaSearcher":  # Ray is imported on first use only
        return optuna_search_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
