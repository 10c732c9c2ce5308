"""Exceptions autoprune raises for bad input.

Every error a user can cause derives from :class:`AutopruneError`; the CLI turns
these into one line on stderr and exit status 2, so messages must say what was
wrong and what would be right.
"""

import math
import reprlib


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


class CriterionError(AutopruneError, ValueError):
    """Unknown criterion, a malformed mix, or too little calibration data for a criterion."""


class OptionError(AutopruneError, ValueError):
    """An option outside its choices (unknown method, greedy mode, clusters, a bad count)."""


class SizeError(AutopruneError, ValueError):
    """A size or count too large to be sensible, or to fit in memory."""


class _Repr(reprlib.Repr):
    """``reprlib`` with every size bounded: long ints and bytes are cut before they are
    converted, dict/list subclasses are shown as dicts/lists."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple = 2, 4, 6, 6
        self.maxset, self.maxfrozenset = 6, 6
        self.maxstring, self.maxother, self.maxlong = 40, 40, 24

    def repr1(self, x: object, level: int) -> str:
        if isinstance(x, dict) and type(x) is not dict:
            return self.repr_dict(x, level)
        if isinstance(x, list) and type(x) is not list:
            return self.repr_list(x, level)
        return super().repr1(x, level)

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() <= 64:
            return repr(x)
        digits = int(x.bit_length() * math.log10(2)) + 1
        return f"{'-' if x < 0 else ''}<an integer of about {digits} digits>"

    def repr_bytes(self, x: bytes, level: int) -> str:
        return repr(x[:self.maxstring]) + ("..." if len(x) > self.maxstring else "")

    def repr_instance(self, x: object, level: int) -> str:
        """Other scalars (floats, dates, tensors): their repr is cut."""
        try:
            return clip(repr(x), self.maxother)
        except Exception:  # noqa: BLE001 - only for display
            return f"<{type(x).__name__}>"


_REPR = _Repr()


def clip(text: str, limit: int = 60) -> str:
    """``text`` on one line, cut to ``limit`` characters (marked with ...)."""
    cut = len(text) > limit
    text = " ".join(text[:limit].split())
    return text[:limit - 3] + "..." if cut or len(text) > limit else text


def short(value: object, limit: int = 60) -> str:
    """A short repr of a user's value for an error message: never longer than ``limit``
    and never built in full (a 10-million-item list costs what its first items cost; a
    huge integer is never converted to text), so a hostile value never floods a message."""
    return clip(_REPR.repr(value), limit)
