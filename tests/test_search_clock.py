"""The search's clock record (autoprune.search.clock): a resumed search counts the time of
every process it ran in (its own cost only up to each process's structure), a killed process
loses at most one heartbeat, and a record that is not one is refused with one line."""

import json
import time

import pytest

from autoprune.errors import AutopruneError
from autoprune.search.clock import CLOCK_FILE, SearchClock, read_segments


def _record(path, segments):
    (path / CLOCK_FILE).write_text(json.dumps({"segments": segments}))


def test_a_new_search_starts_the_record_and_a_resume_adds_the_earlier_segments(tmp_path):
    _record(tmp_path, [[100.0, 130.0]])  # a stale record: a new search ignores it
    with SearchClock(tmp_path, started_at=1000.0, resume=False) as clock:
        assert clock.earlier_s == 0 and clock.complete and clock.elapsed_s(now=1012.5) == pytest.approx(12.5)
    (first,) = read_segments(tmp_path / CLOCK_FILE)
    assert first[0] == 1000.0 and first[1] >= time.time() - 60 and first[2] is None
    later = time.time()
    with SearchClock(tmp_path, started_at=later, resume=True) as clock:
        span = first[1] - first[0]
        assert clock.earlier_s == pytest.approx(span)
        assert clock.elapsed_s(now=later + 3.0) == pytest.approx(span + 3.0)
    again = read_segments(tmp_path / CLOCK_FILE)
    assert again[0] == first and again[1][0] == later and len(again) == 2


def test_the_search_cost_stops_at_each_process_mark(tmp_path):
    """An earlier process that reached its final fine-tune (marked) counts up to its mark in
    the search cost and whole in the elapsed time; one killed before it counts whole in both."""
    _record(tmp_path, [[1000.0, 1100.0], [2000.0, 2300.0, 2050.0]])
    with SearchClock(tmp_path, started_at=3000.0, resume=True) as clock:
        assert clock.earlier_s == pytest.approx(100 + 300)
        assert clock.mark_searched(now=3020.0) == pytest.approx(100 + 50 + 20)
        assert clock.elapsed_s(now=3030.0) == pytest.approx(100 + 300 + 30)
        assert read_segments(tmp_path / CLOCK_FILE)[-1][2] == 3020.0  # the mark is recorded at once


def test_the_record_is_rewritten_while_the_process_runs(tmp_path):
    """A process killed outright writes nothing at its end: the heartbeat must keep seen_at
    moving (three heartbeats after the write on entry), and stop when the process is done."""
    with SearchClock(tmp_path, started_at=time.time(), resume=False, interval=0.05) as clock:
        seen = [read_segments(tmp_path / CLOCK_FILE)[0][1]]  # the write on entry
        deadline = time.time() + 20
        while len(set(seen)) < 4 and time.time() < deadline:
            time.sleep(0.05)
            seen.append(read_segments(tmp_path / CLOCK_FILE)[0][1])
        assert len(set(seen)) >= 4 and seen == sorted(seen)
    assert not clock._thread.is_alive()
    final = read_segments(tmp_path / CLOCK_FILE)[0][1]
    time.sleep(0.2)
    assert read_segments(tmp_path / CLOCK_FILE)[0][1] == final


def test_an_interrupted_process_records_its_segment_and_the_interrupt_propagates(tmp_path):
    start = time.time()
    with pytest.raises(KeyboardInterrupt):
        with SearchClock(tmp_path, started_at=start, resume=False, interval=60):
            time.sleep(0.1)
            raise KeyboardInterrupt
    (seg,) = read_segments(tmp_path / CLOCK_FILE)
    assert seg[0] == start and seg[1] >= start + 0.1 and seg[2] is None


def test_a_resume_without_a_record_warns_and_is_marked_incomplete(tmp_path):
    with pytest.warns(UserWarning, match="holds no clock.json"):
        clock = SearchClock(tmp_path, started_at=time.time(), resume=True)
    assert not clock.complete and clock.earlier_s == 0


@pytest.mark.parametrize("text, why", [
    ("{not json", "Expecting property name"),
    ('{"other": []}', "segments"),
    ('{"segments": {"a": 1}}', "not a list"),
    ('{"segments": [[5, 3]]}', "started_at <="),
    ('{"segments": [[1, 2, 3, 4]]}', "a segment is not"),
    ('{"segments": [[1, 5, 9]]}', "a segment is not"),  # mark after seen_at
    ('{"segments": [[true, 2]]}', "a segment is not"),
    ('{"segments": [[1, "2"]]}', "a segment is not"),
    ('{"segments": [[1, NaN]]}', "a segment is not"),
    ('{"segments": [[-1e308, 1e308]]}', "a segment is not"),  # would count infinite time
    ('{"segments": [[1, 1' + "0" * 400 + ']]}', "a segment is not"),  # int too large for a float
    ('{"segments": [[1, 9e12]]}', "a day from now"),
    ('{"segments": ' + "[" * 100_000 + "]" * 100_000 + "}", "recursion"),
    ('{"segments": [' + ",".join(["[1, 2]"] * 10_001) + "]}", "at most 10,000"),
], ids=["not-json", "no-segments", "not-a-list", "ends-before-start", "four-times", "mark-after-seen",
        "bool", "string", "nan", "infinite-span", "huge-int", "far-future", "deep-nesting", "too-many"])
def test_a_record_that_is_not_one_is_refused_with_one_line(tmp_path, text, why):
    path = tmp_path / CLOCK_FILE
    path.write_text(text)
    with pytest.raises(AutopruneError) as info:
        SearchClock(tmp_path, started_at=time.time(), resume=True)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and why in msg and "delete it" in msg
    SearchClock(tmp_path, started_at=time.time(), resume=False)  # a new search does not read it


def test_an_oversized_record_is_refused_without_reading_it(tmp_path):
    path = tmp_path / CLOCK_FILE
    with open(path, "wb") as f:
        f.truncate((1 << 20) + 1)
    with pytest.raises(AutopruneError, match="larger than"):
        read_segments(path)


def test_a_failed_final_write_after_a_finished_search_warns_instead_of_failing(tmp_path, monkeypatch):
    clock = SearchClock(tmp_path, started_at=time.time(), resume=False, interval=60)
    with pytest.warns(UserWarning, match="could not be recorded"):
        with clock:
            (tmp_path / "a-file").write_text("")
            monkeypatch.setattr(clock, "path", tmp_path / "a-file" / CLOCK_FILE)  # cannot be written


def test_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        SearchClock(tmp_path, started_at=0.0, resume=False, interval=0)
