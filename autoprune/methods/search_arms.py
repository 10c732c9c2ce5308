"""Search arms: the structure search with one part changed, so a comparison can tell what
each part of the search contributes. Each is a run of :func:`autoprune.search.search` with
the same search space, trials, proxy and final fine-tune, plus the overrides below
(``search_options``, handed to ``search()`` by :func:`autoprune.prune`):

``random``
    EagleEye's random-search baseline: structures drawn by Optuna's RandomSampler from the
    search space, no enqueued uniform/greedy seed trials, the best by the proxy fine-tuned.
    What the sampler (and the seeds) add over chance.
``search_widths``
    The ablation that searches widths only: every channel ranked by the arms' default
    criterion (``di``), no criterion mix, no clusters, no self-grouping. Beside ``greedy``
    and ``uniform`` it shows what structure search contributes; beside ``search``, what the
    criterion mix (and clusters) contribute.

Like ``search``, these are registry entries, not width methods: ``prune(method="random")``
and ``autoprune compare --methods random`` run them; ``autoprune prune --method random``
is refused with a line saying so (it has no search-space options).
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

from ..errors import OptionError
from .search import Search


class SearchArm:
    """What the arms share (a mixin, not itself a registered method): the ``search()``
    overrides, and refusing to run as a plain width method."""

    name: ClassVar[str]
    search_options: ClassVar[dict] = {}

    def check(self, options: Mapping[str, Any]) -> None:
        raise OptionError(f"method {self.name!r} is a search run (the search with {self.changes}), not a "
                          f"width method: run it with autoprune.prune(..., method={self.name!r}) or "
                          f"'autoprune compare --methods {self.name}'")

    def widths(self, space, budget, context) -> Any:
        self.check({})


class Random(SearchArm, Search):
    name = "random"
    help = "EagleEye-style random search: the search space, trials and proxy of search, random sampler, no seeds"
    changes = "a random sampler and no seed trials"
    search_options = {"sampler": "random", "seed_trials": False}


class SearchWidths(SearchArm, Search):
    name = "search_widths"
    help = "ablation: the search over widths only, channels ranked by di (no criterion mix, clusters or self-grouping)"
    changes = "widths only, ranked by di"
    search_options = {"criterion": Search.default_criterion}
