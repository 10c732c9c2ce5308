"""autoprune's own JSON records are read in bounded memory, and never block on a FIFO.

``json_file.read_json`` reads at most its bound (plus one byte) and parses only a file within
it; each reader of a record (compare's reuse of a report, an output set's manifest, a search's
search.json) turns what it raises into its own one line.
"""

from __future__ import annotations

import json
import os

import pytest

from autoprune import cli
from autoprune.budget import Budget
from autoprune.compare import _finished
from autoprune.json_file import RECORD_BYTES, read_json, size_text
from autoprune.outputs import MANIFEST, read_manifest
from autoprune.search.runner import SETTINGS_FILE

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


def test_the_bound_is_exact(tmp_path):
    path = tmp_path / "r.json"
    path.write_text('{"a": 1}' + " " * 92)  # 100 bytes of valid JSON
    assert read_json(path, 100) == {"a": 1}
    with pytest.raises(ValueError, match="larger than 99 bytes"):
        read_json(path, 99)


def test_size_text_says_whole_mib_and_otherwise_bytes():
    assert size_text(16 << 20) == "16 MiB" and size_text(RECORD_BYTES) == "16 MiB"
    assert size_text(1000) == "1,000 bytes" and size_text((1 << 20) + 1) == "1,048,577 bytes"


def test_bytes_that_are_not_utf8_or_json_are_value_errors_and_a_missing_file_an_os_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ValueError):
        read_json(bad)
    with pytest.raises(OSError):
        read_json(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(tmp_path)


@needs_fifo
@pytest.mark.timeout(20)
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    with pytest.raises(ValueError, match="not a regular file"):
        read_json(fifo)
    os.mkfifo(tmp_path / MANIFEST)
    assert read_manifest(tmp_path) is None


REPORT = {  # the fields compare reads from a finished run, with settings that match
    "settings": {"method": "uniform", "seed": 0},
    "pruned": {"accuracy": 0.9, "accuracy_adaptive_bn": 0.5, "flops": 50, "params": 10, "latency_ms": 1.0},
    "base": {"flops": 100}, "elapsed_s": 3.0, "widths": {"conv1": [8, 16]},
    "compute": {"proxy_evaluations": 0, "finetunes": 1, "finetune_s": 2.0, "method_s": 1.0, "search_cost": 0.5},
}


def test_compare_reuses_a_report_within_the_bound_and_reruns_one_beyond_it(tmp_path, capsys):
    run = tmp_path / "runs" / "flops-50pct-uniform-s0"
    run.mkdir(parents=True)
    path = run / "report.json"
    budget, expected = Budget.parse("flops<=50%"), REPORT["settings"]
    path.write_text(json.dumps(REPORT))
    assert _finished(path, budget, "uniform", 0, expected) == REPORT
    path.write_text(json.dumps(REPORT) + " " * RECORD_BYTES)  # the same run, one bound too long
    assert _finished(path, budget, "uniform", 0, expected) is None
    assert "runs/flops-50pct-uniform-s0/report.json is unreadable; rerunning" in capsys.readouterr().err


@pytest.mark.parametrize("content, needle", [
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),  # deeper than Python's parser goes
    ("{}" + " " * RECORD_BYTES, "larger than 16 MiB"),
])
def test_resume_from_a_hostile_search_json_is_one_line(tmp_path, capsys, content, needle):
    out = tmp_path / "run"
    out.mkdir()
    (out / SETTINGS_FILE).write_text(content)
    assert cli.main(["search", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("autoprune: error:") and needle in err, err
    assert "Traceback" not in err
