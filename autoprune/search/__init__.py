"""Structure search: YAML search spaces (:mod:`.space`) for Optuna define-by-run sampling."""

from .space import Candidate, SearchSpace, SearchSpaceError, load

__all__ = ["Candidate", "SearchSpace", "SearchSpaceError", "load"]
