"""An interrupted proxy-fidelity study resumes where it stopped.

A study (:func:`autoprune.fidelity.proxy_fidelity`) fully fine-tunes every structure at every
budget, an hour or more on a real benchmark. With an output folder it rewrites
``fidelity-progress.json`` there (atomically) after each structure: the study's settings
(:func:`study_settings`) and every finished row. Run again with the same settings, it reuses
those rows and measures only the rest (the structures are drawn again from the same seed, and
each kept row must carry the same structure). Run with other settings, it says which differ
(:func:`autoprune.differences.differences`) and starts over. A file that is not such a record
(bad JSON, wrong shape, more than :data:`MAX_BYTES`, a row that is not a finished
measurement) is refused with one line naming it, so a damaged record is never silently
mixed into a result. :func:`autoprune.fidelity.write_fidelity` removes the file once
``fidelity.json`` holds the whole study.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .checkpoint import write_json
from .differences import differences, plain
from .errors import AutopruneError

__all__ = ["MAX_BYTES", "PROGRESS_FILE", "Progress", "study_settings"]

PROGRESS_FILE = "fidelity-progress.json"
MAX_BYTES = 64 << 20
"""A record larger than this is refused (10,000 structures x a few budgets fit easily)."""
ROW_KEYS = {"candidate", "config", "flops", "params", "proxy", "accuracy_adaptive_bn", "final"}


def study_settings(model, data, spec, budgets: Sequence, **options) -> dict:
    """Everything a study's rows depend on, as JSON reads it back: the data (name and split
    settings), the baseline's digest, the space's digest, the budgets, ``options`` (n, seed,
    fine-tune, BN and calibration settings) and autoprune's version."""
    from .pipeline import baseline_digest, release
    from .search.runner import space_digest

    return plain({"data": {"name": data.name, "settings": dict(data.settings)}, "baseline": baseline_digest(model),
                  "space": space_digest(spec), "budgets": [str(b) for b in budgets], "options": dict(options),
                  "autoprune": release()})


def _number(x, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high


def _check_row(row, index: int, config: Mapping, names: Sequence[str]) -> None:
    """ValueError unless ``row`` is the finished measurement of structure ``index`` (``config``)."""
    if not isinstance(row, dict) or set(row) != ROW_KEYS:
        raise ValueError(f"row {index} does not have the keys {sorted(ROW_KEYS)}")
    if row["candidate"] != index or row["config"] != plain(config):
        raise ValueError(f"row {index} is not structure {index} of this study's draw")
    if not _number(row["flops"], 0) or not _number(row["params"], 0):
        raise ValueError(f"row {index}: flops and params must be non-negative numbers")
    proxy = row["proxy"]
    if not isinstance(proxy, dict) or set(proxy) != set(names) or not all(_number(v) for v in proxy.values()):
        raise ValueError(f"row {index}: proxy must give a number for each of {list(names)}")
    if not _number(row["accuracy_adaptive_bn"], 0, 1) or not _number(row["final"], 0, 1):
        raise ValueError(f"row {index}: accuracies must be numbers from 0 to 1")


class Progress:
    """The finished rows of a study, kept in ``out/fidelity-progress.json`` (nothing kept
    without ``out``). ``configs``: the structures drawn, in order; ``names``: the proxies."""

    def __init__(self, out: "str | Path | None", settings: Mapping, configs: Sequence[Mapping],
                 names: Sequence[str]):
        self.path = Path(out) / PROGRESS_FILE if out is not None else None
        self.settings = plain(settings)
        self.rows: dict[str, list[dict]] = {b: [] for b in self.settings["budgets"]}
        if self.path is not None and self.path.is_file():
            self._resume(configs, names)

    def _resume(self, configs: Sequence[Mapping], names: Sequence[str]) -> None:
        fix = "delete it to start the study over"
        try:
            if self.path.stat().st_size > MAX_BYTES:
                raise ValueError(f"larger than {MAX_BYTES >> 20} MiB")
            record = json.loads(self.path.read_text())
            if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) \
                    or not isinstance(record.get("rows"), dict):
                raise ValueError("not an object with settings and rows")
            changed = differences(record["settings"], self.settings)
            if changed:
                print(f"fidelity: {self.path} was measured with other settings ({changed}); starting over",
                      file=sys.stderr)
                return
            rows = record["rows"]
            if set(rows) != set(self.rows):
                raise ValueError("its budgets are not the study's")
            for budget, kept in rows.items():
                if not isinstance(kept, list) or len(kept) > len(configs):
                    raise ValueError(f"{budget}: not a list of at most {len(configs)} rows")
                for i, row in enumerate(kept):
                    _check_row(row, i, configs[i], names)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise AutopruneError(f"{self.path}: not a fidelity progress record ({exc}); {fix}") from None
        self.rows = {b: rows[b] for b in self.rows}
        done = sum(map(len, self.rows.values()))
        if done:
            print(f"fidelity: resuming from {self.path}: {done} of {len(configs) * len(self.rows)} "
                  f"structure measurements done", file=sys.stderr)

    def done(self, budget: str) -> list[dict]:
        """The finished rows at ``budget``, structures 0, 1, … in order."""
        return list(self.rows[budget])

    def add(self, budget: str, row: Mapping) -> None:
        """Keep ``row`` (the next structure at ``budget``) and rewrite the record."""
        self.rows[budget].append(plain(row))
        if self.path is not None:
            write_json(self.path, {"settings": self.settings, "rows": self.rows})
