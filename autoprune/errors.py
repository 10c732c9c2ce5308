"""Exceptions autoprune raises for bad input.

Every error a user can cause derives from :class:`AutopruneError`; the CLI turns
these into one line on stderr and exit status 2, so messages must say what was
wrong and what would be right.
"""


class AutopruneError(Exception):
    """Base class of all user-facing autoprune errors."""


class BudgetError(AutopruneError, ValueError):
    """A budget string is malformed or cannot be reached by the model."""


class ModelError(AutopruneError, ValueError):
    """Unknown model name, or a model the dependency graph cannot handle."""


class DataError(AutopruneError, ValueError):
    """Unknown dataset, missing files, or data incompatible with the model."""


class CheckpointError(AutopruneError, ValueError):
    """A checkpoint is missing, truncated, or belongs to another architecture."""
