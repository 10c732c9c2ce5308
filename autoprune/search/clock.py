"""The wall time a search has spent, kept across interruptions.

A search stopped by Ctrl-C, a killed driver or the end of a session and then resumed runs in
several processes; its cost (``report["compute"]["method_s"]``, ``elapsed_s``, hence
``search_cost``) is the time of all of them. Each process is one *segment*: while it runs, a
daemon thread rewrites ``out/clock.json`` (atomically) every ``interval`` seconds with every
earlier segment and this one's ``[started_at, seen_at, searched_at]`` (Unix seconds;
``searched_at`` is when the process had its structure, before the final fine-tune, or null
before then), so a process that is killed outright (SIGKILL writes nothing at the end) loses
at most ``interval`` seconds of its record. A resumed search reads the earlier segments and
adds their durations: all of each for ``elapsed_s``, and up to ``searched_at`` where there is
one for ``method_s`` (a process that reached its final fine-tune or finished and is then
resumed did no search work after that mark). A new search in the same folder starts afresh.

The record is written by the search and read only by a resume of the same search; a file
that is not such a record (or whose times are implausible: before 1970, later than a day from
now, a segment ending before it starts) is refused with one line (:class:`AutopruneError`)
naming it, so an unreadable record never silently miscounts a run's cost. A resume that finds
no record (a search started by a version without it) warns, and :attr:`SearchClock.complete`
is False.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from pathlib import Path

from ..checkpoint import write_json
from ..errors import AutopruneError
from ..json_file import read_json

CLOCK_FILE = "clock.json"
MAX_SEGMENTS = 10_000  # a search resumed more often than this is not a record this code wrote
MAX_BYTES = 1 << 20
FUTURE_S = 86_400.0  # a time later than this past now is not a record of this machine


def _time(t) -> bool:
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return False
    try:
        return math.isfinite(float(t))
    except OverflowError:  # an int beyond any float
        return False


def _segment(seg, now: float) -> list:
    """``seg`` as ``[started_at, seen_at, searched_at | None]`` (a two-element segment has no
    mark); ValueError if it is not one."""
    ok = isinstance(seg, list) and len(seg) in (2, 3) and _time(seg[0]) and _time(seg[1]) \
        and (len(seg) == 2 or seg[2] is None or _time(seg[2]))
    if ok:
        start, seen, mark = float(seg[0]), float(seg[1]), (float(seg[2]) if len(seg) == 3 and seg[2] is not None
                                                             else None)
        if 0 < start <= seen <= now + FUTURE_S and (mark is None or start <= mark <= seen):
            return [start, seen, mark]
    raise ValueError("a segment is not [started_at, seen_at, searched_at] with 1970 < started_at <= "
                     f"searched_at <= seen_at <= a day from now: {str(seg)[:60]}")


def read_segments(path: Path) -> list[list]:
    """The ``[started_at, seen_at, searched_at | None]`` segments recorded in ``path`` ([] if
    it does not exist); AutopruneError if it is not a clock record."""
    if not path.is_file():
        return []
    fix = "delete it to resume without counting the earlier processes' time"
    try:
        segments = read_json(path, MAX_BYTES)["segments"]
        if not isinstance(segments, list) or len(segments) > MAX_SEGMENTS:
            raise ValueError("segments is not a list of at most 10,000 entries")
        now = time.time()
        return [_segment(seg, now) for seg in segments]
    except (OSError, ValueError, KeyError, TypeError, ArithmeticError, RecursionError) as exc:
        raise AutopruneError(f"{path}: not a search clock record ({exc}); {fix}") from None


def _method_s(seg: list) -> float:
    start, seen, mark = seg
    return (seen if mark is None else mark) - start


class SearchClock:
    """This process's segment of a search's time, recorded in ``out/clock.json``.

    ``started_at``: when this process's part began (Unix seconds). With ``resume=True`` the
    segments already in the file are kept and counted (:attr:`earlier_s`); otherwise the
    file is started afresh. Use as a context manager: the record is written on entry, every
    ``interval`` seconds from a daemon thread, and on exit. :meth:`mark_searched` records
    when the structure was chosen (the search's own cost ends there).
    """

    def __init__(self, out: Path, started_at: float, resume: bool, interval: float = 5.0):
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        self.path = Path(out) / CLOCK_FILE
        self.started_at = float(started_at)
        self.interval = float(interval)
        self.complete = not resume or self.path.is_file()
        if not self.complete:
            warnings.warn(f"{Path(out)} holds no {CLOCK_FILE} (a search started by an older version): its "
                          "compute record counts only this process's time", stacklevel=3)
        self.earlier = read_segments(self.path) if resume else []
        self.searched_at: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def earlier_s(self) -> float:
        """Wall seconds the earlier processes of this search spent (0 for a new search)."""
        return sum(seen - start for start, seen, _ in self.earlier)

    def elapsed_s(self, now: float | None = None) -> float:
        """Every process's wall seconds so far: the earlier segments and this one's to ``now``."""
        return self.earlier_s + ((time.time() if now is None else now) - self.started_at)

    def mark_searched(self, now: float | None = None) -> float:
        """Record that this process has its structure (now, or ``now``) and return the search's
        own cost: every earlier process's time up to its mark (all of it where it had none)
        and this one's to now."""
        self.searched_at = time.time() if now is None else now
        self.write()
        return sum(_method_s(seg) for seg in self.earlier) + (self.searched_at - self.started_at)

    def write(self) -> None:
        """Record the segments with this one seen now (atomically)."""
        with self._lock:
            now = max(time.time(), self.started_at, self.searched_at or 0.0)
            write_json(self.path, {"segments": [*self.earlier, [self.started_at, now, self.searched_at]]})

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
            except OSError:  # a full disk or a removed folder: the final write says so
                pass

    def __exit__(self, kind, *_) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.write()
        except OSError as exc:
            if kind is None:  # the search's outputs are written; its record could not be
                warnings.warn(f"{self.path}: the search's time could not be recorded ({exc}); a resume "
                              "of this folder would not count this process", stacklevel=2)
            # with an exception on its way (Ctrl-C, an error), that one is what to report
