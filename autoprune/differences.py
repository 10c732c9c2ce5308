"""What changed between recorded settings and the ones a rerun would use, in one line.

A finished run (:mod:`autoprune.compare`) or an interrupted study (:mod:`autoprune.fidelity`)
is reused only when the settings it recorded equal this run's; otherwise it is redone, and
the line :func:`differences` builds (``"finetune_epochs 5 -> 3, trials 16 -> 8"``) says why.
Both sides are compared as they read back from JSON (:func:`plain`).
"""

from __future__ import annotations

import json
from typing import Mapping, Sequence

from .errors import clip, short

__all__ = ["differences", "flat", "plain"]


def plain(value):
    """``value`` as it reads back from JSON (tuples as lists, keys as text, others as ``str``)."""
    return json.loads(json.dumps(value, default=str))


def flat(settings: Mapping, prefix: str = "") -> dict:
    """Nested settings as one level of dotted keys (``{"options.lr": 0.01, ...}``); an empty
    mapping stays a value."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, Mapping) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def differences(recorded: Mapping, expected: Mapping, keys: "Sequence[str] | None" = None) -> str:
    """``"finetune_epochs 5 -> 3, trials 16 -> 8"``: every setting (``keys``: only those) whose
    recorded value differs from the expected one, the first four named; empty if none does."""
    old, new = flat(recorded), flat(expected)
    keys = list(keys) if keys is not None else [*new, *(k for k in old if k not in new)]
    missing = object()

    def show(value) -> str:
        return "(none)" if value is missing else short(value, 24)

    def name(key: str) -> str:  # a recorded name is text from a file: escaped, bounded
        return clip(repr(str(key)[:80])[1:-1], 40)

    parts = [f"{name(k.removeprefix('options.'))} {show(old.get(k, missing))} -> {show(new.get(k, missing))}"
             for k in keys if old.get(k, missing) != new.get(k, missing)]
    return ", ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")
