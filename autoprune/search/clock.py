"""The wall time a search has spent, kept across interruptions.

A search stopped by Ctrl-C, a killed driver or the end of a session and then resumed runs in
several processes; its cost (``report["compute"]["method_s"]``, ``elapsed_s``, hence
``search_cost``) is the time of all of them. Each process is one *segment*: while it runs, a
daemon thread rewrites ``out/clock.json`` (atomically) every ``interval`` seconds with every
earlier segment and this one's ``[started_at, seen_at]`` (Unix seconds), so a process that is
killed outright (SIGKILL writes nothing at the end) loses at most ``interval`` seconds of its
record. A resumed search reads the earlier segments and adds their durations
(:attr:`SearchClock.earlier_s`); a new search in the same folder starts the record afresh.

The record is written by the search and read only by a resume of the same search; a file
that is not such a record is refused with one line (:class:`AutopruneError`) naming it, so
an unreadable record never silently undercounts a run's cost.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

from ..checkpoint import write_json
from ..errors import AutopruneError

CLOCK_FILE = "clock.json"
MAX_SEGMENTS = 10_000  # a search resumed more often than this is not a record this code wrote
MAX_BYTES = 1 << 20


def read_segments(path: Path) -> list[list[float]]:
    """The ``[started_at, seen_at]`` segments recorded in ``path`` ([] if it does not exist);
    AutopruneError if it is not a clock record."""
    if not path.is_file():
        return []
    fix = "delete it to resume without counting the earlier processes' time"
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        segments = json.loads(path.read_text())["segments"]
        if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
            raise ValueError("segments is not a list of at most 10,000 entries")
        for seg in segments:
            if not (isinstance(seg, list) and len(seg) == 2
                    and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                            for t in seg) and seg[0] <= seg[1]):
                raise ValueError(f"a segment is not [started_at, seen_at] with started_at <= seen_at: "
                                 f"{str(seg)[:60]}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AutopruneError(f"{path}: not a search clock record ({exc}); {fix}") from None
    return [[float(a), float(b)] for a, b in segments]


class SearchClock:
    """This process's segment of a search's time, recorded in ``out/clock.json``.

    ``started_at``: when this process's part began (Unix seconds). With ``resume=True`` the
    segments already in the file are kept and counted (:attr:`earlier_s`); otherwise the
    file is started afresh. Use as a context manager: the record is written on entry, every
    ``interval`` seconds from a daemon thread, and on exit.
    """

    def __init__(self, out: Path, started_at: float, resume: bool, interval: float = 5.0):
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.path = Path(out) / CLOCK_FILE
        self.started_at = float(started_at)
        self.interval = float(interval)
        self.earlier = read_segments(self.path) if resume else []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def earlier_s(self) -> float:
        """Wall seconds the earlier processes of this search spent (0 for a new search)."""
        return sum(b - a for a, b in self.earlier)

    def elapsed_s(self, now: float | None = None) -> float:
        """Every process's wall seconds so far: the earlier segments and this one's to ``now``."""
        return self.earlier_s + ((time.time() if now is None else now) - self.started_at)

    def write(self) -> None:
        """Record the segments with this one seen now (atomically)."""
        with self._lock:
            now = max(time.time(), self.started_at)
            write_json(self.path, {"segments": [*self.earlier, [self.started_at, now]]})

    def __enter__(self) -> "SearchClock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread = threading.Thread(target=self._beat, name="autoprune-search-clock", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.write()
            except OSError:  # a full disk or a removed folder: the final write reports it
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.path.parent.is_dir():
            self.write()
