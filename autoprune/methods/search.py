"""Search: the registry's entry for the structure search, which is no single width choice
but a run of its own (Optuna on Ray Tune): :func:`autoprune.search.search`, reached through
``prune(method="search")`` or ``autoprune search``."""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import OptionError
from .base import Context, WidthMethod, WidthResult

HINT = ("method 'search' is a run of its own, not a width method: call autoprune.search.search(...) "
        "or autoprune.prune(..., method='search'), or run 'autoprune search'")


class Search(WidthMethod):
    name = "search"
    help = "Optuna structure search on Ray Tune: use 'autoprune search' (or prune(method='search'))"
    needs_calibration = False

    def check(self, options: Mapping[str, Any]) -> None:
        raise OptionError(HINT)

    def widths(self, space, budget, context: Context) -> WidthResult:
        raise OptionError(HINT)
