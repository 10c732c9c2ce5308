"""Compatibility: the names ``autoprune.search.tune`` held before the search was split up.

They now live in :mod:`.runner` (``search``, ``read_settings``, ``driver_state``, the
file names), :mod:`.trial` (``Shared``, ``build_structure``, ``evaluate_candidate``,
``rungs``, ``PENALTY``), :mod:`.trials` (the trials table, ``STATES``, importances) and
:mod:`.searcher` (``OptunaSearcher``, loaded on first use as before, so searches saved
by an older autoprune still resume). The steps are told in :mod:`autoprune.search`.
"""

from .runner import DEFAULT_SPACE, SETTINGS_FILE, SPACE_FILE, TRIALS_FILE, driver_state, read_settings, search
from .searcher import optuna_search_class
from .trial import PENALTY, Shared, build_structure, evaluate_candidate, rungs
from .trials import (STATES, best_trial, importances, mark_seeds, pareto_front, rebuild_study, trial_fields,
                     trial_row, trials_table)

# OptunaSearcher is built on first use by __getattr__ below (it subclasses Ray's Searcher)
__all__ = ["DEFAULT_SPACE", "PENALTY", "SETTINGS_FILE", "SPACE_FILE", "STATES", "TRIALS_FILE", "OptunaSearcher",  # noqa: F822
           "Shared", "best_trial", "build_structure", "driver_state", "evaluate_candidate", "importances",
           "mark_seeds", "pareto_front", "read_settings", "rebuild_study", "rungs", "search", "trial_fields",
           "trial_row", "trials_table"]


def __getattr__(name: str):
    if name == "OptunaSearcher":  # Ray is imported on first use only
        return optuna_search_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
