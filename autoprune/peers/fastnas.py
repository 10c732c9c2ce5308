"""One run of NVIDIA ModelOpt's FastNAS, through its public API only (``modelopt.torch.prune.prune``).

FastNAS sorts the channels of every prunable dimension by importance, scores each width
choice of each dimension alone (the sensitivity map: one ``score_func`` call per choice, until a
dimension stops losing score), then binary-searches one sensitivity threshold whose structure
meets the constraint, which it treats as an upper bound (it may land well below). Before each
score it re-estimates BN statistics on the last 50 batches of its ``data_loader`` (fewer: it
warns and scores stale statistics, refused here). Width choices are 5%..100% of a dimension,
rounded to ``divisor`` channels (its default, 32, leaves 16-channel layers nothing to choose).
Its FLOPs are torchprofile's multiply-adds times 2 (BN excluded); the limit is handed over in
its own count: a percentage of the dense model's, or an absolute upper bound. Needs the
``peers`` extra (:func:`missing`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import itertools
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data import DataBundle
from ..errors import BudgetError, OptionError
from ..evaluate import accuracy, training_batches

__all__ = ["INSTALL", "MIN_BATCHES", "Batches", "Run", "missing", "percent", "run"]

INSTALL = 'pip install -e ".[peers]"'
"""How to install what :func:`run` needs (pyproject.toml's ``peers`` extra)."""

REQUIRED = (("modelopt", "nvidia-modelopt", "0.47."), ("torchprofile", "torchprofile", "0.0.4"))
"""(module, distribution, tested version prefix) of every package :func:`run` imports."""

MIN_BATCHES = 50
"""ModelOpt re-estimates a candidate's BN statistics on a queue of 50 batches; it scores a
candidate on stale statistics while fewer have been seen."""

BATCH_SIZE = 64
"""Images per BN-calibration batch (as the pipeline's adaptive BN)."""

RULE_TYPES = {"channel_divisor": ("nn.Conv1d", "nn.Conv2d", "nn.Conv3d"),
              "feature_divisor": ("nn.Linear", "nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")}
"""The layer types whose width choices FastNAS rounds (by the config key ModelOpt names)."""

STALE_BN = "queue not filled"
"""ModelOpt's warning when it scores a candidate without re-estimating its BN statistics."""


UNSATISFIABLE = "NOT all constraints can be satisfied"
"""The start of ModelOpt's error when no subnet of the search space meets the constraints."""


def missing() -> str | None:
    """None if the ``peers`` extra is importable in a tested version, else a one-line reason
    saying how to install it (cheap: nothing is imported)."""
    for module, distribution, version in REQUIRED:
        if importlib.util.find_spec(module) is None:
            return f"method fastnas needs {distribution}, which is not installed: {INSTALL}"
        try:
            found = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return f"method fastnas needs {distribution} (module {module} belongs to another package): {INSTALL}"
        if not (found + ".").startswith(version):
            return f"method fastnas is tested with {distribution} {version.rstrip('.')}, found {found}: {INSTALL}"
    return None


@dataclass
class Run:
    """FastNAS's pruned copy of the model, its own count of the copy's FLOPs and params
    (``constraints``) and how often it called ``score_func``."""

    model: nn.Module
    constraints: dict
    score_calls: int


class Batches:
    """The first ``n`` shuffled training batches, the same ones every time it is iterated."""

    def __init__(self, dataset: Dataset, n: int, seed: int) -> None:
        self.dataset, self.n, self.seed = dataset, n, seed

    def __iter__(self) -> Iterator:
        return itertools.islice(training_batches(self.dataset, BATCH_SIZE, self.seed), self.n)

    def __len__(self) -> int:
        return self.n


def percent(fraction: float) -> str:
    """A fraction of the dense model as ModelOpt's percentage constraint (``"50.0%"``)."""
    return f"{100 * fraction!r}%"


def run(model: nn.Module, data: DataBundle, kind: str, limit: str | float, *, batches: int, divisor: int,
        checkpoint: str, seed: int, progress: bool) -> Run:
    """FastNAS on ``model`` (changed in place) with at most ``limit`` of ``kind`` (flops or
    params) by its own count (a :func:`percent` of the dense model's, or an absolute number),
    scoring candidates by accuracy on ``data.val`` after BN re-estimation on ``batches``
    training batches; ``checkpoint`` keeps the search state (a later run on an equal model
    reuses its sensitivity map)."""
    import modelopt.torch.prune as mtp

    calls = 0

    def score(candidate: nn.Module) -> float:
        nonlocal calls
        calls += 1
        return accuracy(candidate, data.val)

    rules = {layer: {"*": {key: divisor}} for key, layers in RULE_TYPES.items() for layer in layers}
    device = next(model.parameters()).device
    dummy = torch.zeros(1, *data.input_shape, device=device)
    quiet = contextlib.nullcontext() if progress else _silenced()
    with quiet, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pruned, state = mtp.prune(model, mode=[("fastnas", rules)], constraints={kind: limit},
                                      dummy_input=dummy,
                                      config={"data_loader": Batches(data.train, batches, seed),
                                              "max_iter_data_loader": batches, "score_func": score,
                                              "checkpoint": checkpoint, "verbose": progress})
        except ValueError as error:
            if UNSATISFIABLE not in str(error):
                raise
            raise BudgetError(f"FastNAS cannot reach {kind}<={limit} by its own count with channel "
                              f"divisor {divisor} (its smallest subnet is larger); use a milder budget or a smaller "
                              "fastnas_divisor") from None
    if any(STALE_BN in str(w.message) for w in caught):
        raise OptionError(f"ModelOpt scored FastNAS candidates on stale BN statistics (its data queue was not "
                          f"filled); give it at least {MIN_BATCHES} calibration batches")
    return Run(pruned, dict(state["best"].get("constraints") or {}), calls)


@contextlib.contextmanager
def _silenced():
    """ModelOpt's prints and progress bars swallowed (``progress=False``)."""
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
