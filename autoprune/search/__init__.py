"""Structure search: YAML search spaces (:mod:`.space`) for Optuna define-by-run sampling."""

from .space import Candidate, SearchSpace, SearchSpaceError, load
from .tune import search

__all__ = ["Candidate", "SearchSpace", "SearchSpaceError", "load", "search"]
