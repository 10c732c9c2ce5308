"""The one protocol every width method implements: widths meeting a budget.

A method gets the :class:`~autoprune.space.Space`, the :class:`~autoprune.budget.Budget`
and a :class:`Context` (the model, data, criterion scores and calibration stats, seed,
device and its options) and returns a :class:`WidthResult`: per unit, the channels to keep
(at most the budget's target), optionally a trajectory and, for a method that chooses
its channels itself, the Plan. Selecting channels by score, applying, fine-tuning and
reporting are the pipeline's (:mod:`autoprune.pipeline`), the same for every method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from ..budget import Budget
from ..plan import Plan


@dataclass(frozen=True)
class WidthResult:
    """Kept channels per unit; the method's trajectory and notes; its own Plan if it chose
    the channels too (then ``info["criterion"]`` may name what it ranked them by).
    ``info[<method name>]`` (e.g. the greedy's mode and rule) goes into the report under
    that name. ``model``: the weights the Plan is to be applied to when the method trained
    its own copy of the context's model (greedy with ``greedy_finetune_every``); None: the
    caller's model."""

    widths: dict[str, int]
    trajectory: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    plan: Plan | None = None
    model: Any = None


NO_EVALUATIONS = {"compute": {"proxy_evaluations": 0}}
"""``WidthResult.info`` of a method that scores no candidate structure (uniform, wsp, tp_global):
compute accounting records 0 proxy evaluations, not "unknown"."""


@dataclass
class Context:
    """What a width method may read: ``scores`` are the (mixed) criterion scores and
    ``stats`` the calibration summaries (both None if the method needs no calibration);
    ``model``/``data`` may be None where the caller has none (then a method that needs
    them raises or does without). ``options`` holds method options by their
    :func:`autoprune.prune` names (``greedy_mode``, ``greedy_step``, ``greedy_bn_batches``,
    ``greedy_recalibrate``, ``wsp_variant``); absent keys take the method's defaults.
    ``clusters`` (unit → channel labels, or None) are the labels the pipeline will select
    the Plan's channels with; a method that evaluates channel sets (greedy) must use them.
    ``criterion`` (name → weight, or None) is what ``scores`` were made with and
    ``calibration`` the (re-iterable) batches ``stats`` were calibrated on: the greedy
    re-scores by that criterion on those images."""

    model: Any
    data: Any
    space: Any
    budget: Budget
    scores: Mapping | None = None
    stats: Any = None
    seed: int = 0
    device: Any = None
    progress: bool = True
    options: dict = field(default_factory=dict)
    clusters: Mapping | None = None
    criterion: Mapping | None = None
    calibration: Any = None


class WidthMethod:
    """Base class: set ``name``, ``help`` (one line for the CLI and README) and
    ``needs_calibration`` (whether the pipeline calibrates and scores before calling
    :meth:`widths`; a method whose WidthResult carries its own Plan may not need it);
    implement :meth:`widths`; override :meth:`check` to validate options up front and
    :meth:`calibrates` to have the pipeline calibrate what the method reads itself."""

    name: ClassVar[str]
    help: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    default_criterion: ClassVar[str] = "di"
    """The criterion (scores, channel selection) when the caller names none."""

    @classmethod
    def available(cls) -> str | None:
        """None if the method can run in this environment, else a one-line reason saying what
        to install (a peer behind an optional extra: ``fastnas``). Cheap: imports nothing heavy.
        :func:`autoprune.pipeline.check_options` (so ``prune``) refuses an unavailable method
        with that line; ``compare`` checks its options (:meth:`check`) and then skips it."""
        return None

    def check(self, options: Mapping[str, Any]) -> None:
        """AutopruneError naming the option, its value and the choices, before any work (the
        values only: it runs for an unavailable method too)."""

    def calibrates(self, options: Mapping[str, Any]) -> tuple[str, ...]:
        """Criteria whose calibration summaries the method reads itself (``context.stats``),
        calibrated in the same pass as the criterion's, even when ``needs_calibration`` is
        False (WSP's data variant: ``wsp_data``). Default: none."""
        return ()

    def widths(self, space, budget: Budget, context: Context) -> WidthResult:
        """Per unit, the channels to keep; the cost must be at most ``budget.target(space)``."""
        raise NotImplementedError
