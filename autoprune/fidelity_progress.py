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

A finished study is reused the same way: ``fidelity.json`` records the study's settings, and a
run with the same settings takes every row from it (nothing is measured, no calibration);
one measured with other settings, or by an autoprune that recorded none, is measured again
(one line on stderr says why), so a changed baseline never keeps an old study's numbers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Mapping, Sequence

from .checkpoint import atomic_write_text
from .differences import differences, plain
from .errors import AutopruneError
from .json_file import read_json

__all__ = ["FINISHED_FILE", "MAX_BYTES", "PROGRESS_FILE", "Progress", "study_settings"]

PROGRESS_FILE = "fidelity-progress.json"
FINISHED_FILE = "fidelity.json"
MAX_BYTES = 64 << 20
"""A record larger than this is refused (rows are ~300 bytes of compact JSON: 200,000 fit)."""
FORMAT = 1
"""The record's format (the RNG seeded per structure since format 1): another one starts over."""
ROW_KEYS = {"candidate", "config", "flops", "params", "proxy", "accuracy_adaptive_bn", "final"}


def study_settings(model, data, spec, budgets: Sequence, **options) -> dict:
    """Everything a study's rows depend on, as JSON reads it back: the data (name and split
    settings), the baseline's digest, the space's digest, the budgets, ``options`` (n, seed,
    fine-tune, BN and calibration settings) and autoprune's version."""
    from .pipeline import baseline_digest, release
    from .search.runner import space_digest

    return plain({"format": FORMAT, "data": {"name": data.name, "settings": dict(data.settings)},
                  "baseline": baseline_digest(model),
                  "space": space_digest(spec), "budgets": [str(b) for b in budgets], "options": dict(options),
                  "autoprune": release()})


def _number(x, low: float = -math.inf, high: float = math.inf) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high


def _check_row(row, index: int, names: Sequence[str]) -> None:
    """ValueError unless ``row`` is a finished measurement of structure ``index`` (its
    structure is checked against the draw by :meth:`Progress.match`)."""
    if not isinstance(row, dict) or set(row) != ROW_KEYS:
        raise ValueError(f"row {index} does not have the keys {sorted(ROW_KEYS)}")
    if type(row["candidate"]) is not int or row["candidate"] != index or not isinstance(row["config"], dict):
        raise ValueError(f"row {index} is not structure {index} of a study's draw")
    if not _number(row["flops"], 0) or not _number(row["params"], 0):
        raise ValueError(f"row {index}: flops and params must be non-negative numbers")
    proxy = row["proxy"]
    if not isinstance(proxy, dict) or set(proxy) != set(names) or not all(_number(v) for v in proxy.values()):
        raise ValueError(f"row {index}: proxy must give a number for each of {list(names)}")
    if not _number(row["accuracy_adaptive_bn"], 0, 1) or not _number(row["final"], 0, 1):
        raise ValueError(f"row {index}: accuracies must be numbers from 0 to 1")


class Progress:
    """The finished rows of a study, kept in ``out/fidelity-progress.json`` (nothing kept
    without ``out``); ``names``: the proxies. A finished study in ``out/fidelity.json`` with the
    same settings is adopted whole (:attr:`finished`); otherwise a progress record there is
    read and checked at once (before any calibration), and :meth:`match` then checks its rows
    against the structures drawn."""

    def __init__(self, out: "str | Path | None", settings: Mapping, names: Sequence[str]):
        self.path = Path(out) / PROGRESS_FILE if out is not None else None
        self.settings = plain(settings)
        self.rows: dict[str, list[dict]] = {b: [] for b in self.settings["budgets"]}
        self.finished = False
        """True when every row came from a finished study's ``fidelity.json``."""
        self._kept: dict | None = None
        if out is None:
            return
        study = Path(out) / FINISHED_FILE
        if study.exists() or study.is_symlink():
            rows = self._read(study, names, "measuring again", complete=True)
            if rows is not None:
                self.rows, self.finished = rows, True
                print(f"fidelity: {study} already holds this study; reusing its "
                      f"{sum(map(len, rows.values()))} structure measurements", file=sys.stderr)
                return
        if self.path.exists() or self.path.is_symlink():
            self._kept = self._read(self.path, names, "starting over")

    @staticmethod
    def _fail(path: Path, why: object) -> AutopruneError:
        what = "finished fidelity study" if path.name == FINISHED_FILE else "fidelity progress record"
        return AutopruneError(f"{path}: not a {what} ({why}); delete it to start the study over")

    def _read(self, path: Path, names: Sequence[str], otherwise: str, complete: bool = False) -> dict | None:
        """The rows recorded in ``path`` (checked but for their structures; with ``complete``,
        ``n`` at every budget), or None if they were measured with other settings (one line on
        stderr says which, then ``otherwise``). A progress record keeps its rows under ``rows``,
        a finished study (``fidelity.json``) under ``candidates``."""
        key = "candidates" if complete else "rows"
        try:
            if not path.is_file():
                raise ValueError("not a file")
            record = read_json(path, MAX_BYTES)
            if not isinstance(record, dict) or not isinstance(record.get(key), dict):
                raise ValueError(f"not an object with {key}")
            if complete and "settings" not in record:  # written before studies recorded their settings
                print(f"fidelity: {path} records no settings (an older autoprune wrote it); {otherwise}",
                      file=sys.stderr)
                return None
            if not isinstance(record.get("settings"), dict):
                raise ValueError("its settings are not an object")
            changed = differences(record["settings"], self.settings)
            if changed:
                print(f"fidelity: {path} was measured with other settings ({changed}); {otherwise}",
                      file=sys.stderr)
                return None
            rows = record[key]
            if set(rows) != set(self.rows):
                raise ValueError("its budgets are not the study's")
            n = self.settings["options"]["n"]
            for budget, kept in rows.items():
                if not isinstance(kept, list) or len(kept) > n or (complete and len(kept) != n):
                    raise ValueError(f"{budget}: not a list of {'exactly' if complete else 'at most'} {n} rows")
                for i, row in enumerate(kept):
                    _check_row(row, i, names)
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self._fail(path, exc) from None
        return rows

    def match(self, configs: Sequence[Mapping]) -> None:
        """Adopt the recorded rows if each is the structure drawn at its place (AutopruneError
        if one is not); say how many were done."""
        if not self._kept:
            return
        for budget, kept in self._kept.items():
            for i, row in enumerate(kept):
                if row["config"] != plain(configs[i]):
                    raise self._fail(self.path, f"row {i} at {budget} is not structure {i} of this study's draw")
        self.rows = {b: self._kept[b] for b in self.rows}
        done = sum(map(len, self.rows.values()))
        if done:
            print(f"fidelity: resuming from {self.path}: {done} of {len(configs) * len(self.rows)} "
                  f"structure measurements done", file=sys.stderr)

    def done(self, budget: str) -> list[dict]:
        """The finished rows at ``budget``, structures 0, 1, … in order."""
        return list(self.rows[budget])

    def add(self, budget: str, row: Mapping) -> None:
        """Keep ``row`` (the next structure at ``budget``) and rewrite the record (compact JSON)."""
        self.rows[budget].append(plain(row))
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"settings": self.settings, "rows": self.rows},
                                                    separators=(",", ":")))
