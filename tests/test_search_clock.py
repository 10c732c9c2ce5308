"""The search's clock record (autoprune.search.clock): a resumed search counts the time of
every process it ran in, a killed process loses at most one heartbeat, and a record that is
not one is refused with one line."""

import json
import time

import pytest

from autoprune.errors import AutopruneError
from autoprune.search.clock import CLOCK_FILE, SearchClock, read_segments


def test_a_new_search_starts_the_record_and_a_resume_adds_the_earlier_segments(tmp_path):
    (tmp_path / CLOCK_FILE).write_text(json.dumps({"segments": [[100.0, 130.0]]}))  # a stale record
    with SearchClock(tmp_path, started_at=1000.0, resume=False) as clock:
        assert clock.earlier_s == 0 and clock.elapsed_s(now=1012.5) == pytest.approx(12.5)
    first = read_segments(tmp_path / CLOCK_FILE)
    assert len(first) == 1 and first[0][0] == 1000.0 and first[0][1] >= time.time() - 60
    later = time.time()
    with SearchClock(tmp_path, started_at=later, resume=True) as clock:
        span = first[0][1] - first[0][0]
        assert clock.earlier_s == pytest.approx(span)
        assert clock.elapsed_s(now=later + 3.0) == pytest.approx(span + 3.0)
    again = read_segments(tmp_path / CLOCK_FILE)
    assert again[0] == first[0] and again[1][0] == later and len(again) == 2


def test_the_record_is_rewritten_while_the_process_runs(tmp_path):
    """A process killed outright writes nothing at its end: the heartbeat must have kept
    seen_at within about one interval of now."""
    start = time.time()
    with SearchClock(tmp_path, started_at=start, resume=False, interval=0.05):
        seen = [start]
        deadline = time.time() + 20
        while len(set(seen)) < 3 and time.time() < deadline:  # at least two heartbeats
            time.sleep(0.05)
            seen.append(read_segments(tmp_path / CLOCK_FILE)[0][1])
        assert len(set(seen)) >= 3 and seen == sorted(seen)


@pytest.mark.parametrize("text, why", [
    ("{not json", "Expecting property name"),
    ('{"other": []}', "segments"),
    ('{"segments": {"a": 1}}', "not a list"),
    ('{"segments": [[5, 3]]}', "started_at <= seen_at"),
    ('{"segments": [[1, 2, 3]]}', "not [started_at, seen_at]"),
    ('{"segments": [[true, 2]]}', "not [started_at, seen_at]"),
    ('{"segments": [[1, "2"]]}', "not [started_at, seen_at]"),
    ('{"segments": [[1, NaN]]}', "not [started_at, seen_at]"),
    ('{"segments": [' + ",".join(["[1, 2]"] * 10_001) + "]}", "at most 10,000"),
])
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


def test_interval_must_be_positive(tmp_path):
    with pytest.raises(ValueError):
        SearchClock(tmp_path, started_at=0.0, resume=False, interval=0)
