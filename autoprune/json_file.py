"""Reading autoprune's own JSON records in bounded memory.

A run's ``report.json`` and ``manifest.json``, a search's ``search.json`` and clock, a
fidelity study's records: autoprune wrote them, but they can come from elsewhere (kept runs
restored from a clone, a folder copied from another machine) or be damaged. Each is read
through :func:`read_json`, which reads at most ``max_bytes`` and parses only a file within
them, and refuses anything but a regular file (a FIFO would block the read forever). Callers
turn its exceptions into their own one-line messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["RECORD_BYTES", "read_json", "size_text"]

RECORD_BYTES = 16 << 20
"""The default bound: a run's report is tens of KB (a ResNet-20 greedy's at 30%: 39 KB)."""


def size_text(n: int) -> str:
    """``n`` bytes as the messages say it: whole MiB where it is one, else bytes."""
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n:,} bytes"


def read_json(path: str | os.PathLike, max_bytes: int = RECORD_BYTES):
    """The JSON value in ``path``. OSError if it cannot be read; ValueError if it is not a
    regular file, is larger than ``max_bytes``, is not UTF-8 or not JSON; RecursionError if it
    nests deeper than Python's parser goes."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError("not a regular file")
    with path.open("rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise ValueError(f"larger than {size_text(max_bytes)}")
    return json.loads(raw)
