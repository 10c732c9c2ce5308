"""A run's outputs (``OUT/model.pt``, ``plan.json``, ``report.json``, ...) written as one set.

:func:`output_set` writes every file to a hidden staging folder in ``OUT``
(``.autoprune-staging-PID-XXXXXXXX``), then ``OUT/manifest.json`` (run id, and each file's
size and SHA-256) is deleted, the files are renamed into place and the new manifest is
renamed in last. Guarantee: when :func:`check_output_set` finds no problem, every file the
manifest lists is byte for byte the one a single run wrote. An error or Ctrl-C while the
set is being staged leaves the old set as it was; a Ctrl-C during the renames lets them
finish (milliseconds), then stops: the old set or the new one, never a mix. A crash
(SIGKILL, power loss) during the renames leaves no manifest, which the check reports as
incomplete. The next write removes abandoned staging folders (their writer is dead) and
stale ``.NAME.*`` temporary files (:data:`autoprune.checkpoint.TEMP_NAME`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

from .checkpoint import TEMP_NAME
from .errors import AutopruneError
from .json_file import read_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "autoprune-outputs/1"
STAGING_PREFIX = ".autoprune-staging-"
_STALE_AFTER_S = 3600  # an unlocked staging folder this old is abandoned even if its pid lives (reused)
_LOADED = time.time()
_log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; abandoned staging folders go after a day
    fcntl = None


@dataclass
class OutputSet:
    """The set being written by :func:`output_set`: write each file to ``path(name)``.

    After the ``with`` block: ``manifest`` (what was committed) and ``replaced`` (when the
    model that was in ``out`` before had been written, e.g. ``"2025-01-31 14:02"``; None if
    ``out`` held no model.pt).
    """

    out: Path
    staging: Path
    names: tuple[str, ...] | None = None
    manifest: dict | None = None
    replaced: str | None = None

    def path(self, name: str) -> Path:
        """Where to write the file ``name`` (a plain file name) of the set."""
        _check_name(name)
        if self.names is not None and name not in self.names:
            raise ValueError(f"{name!r} is not one of the set's files ({', '.join(self.names)})")
        return self.staging / name


@contextmanager
def output_set(out: str | os.PathLike, names: Iterable[str] | None = None) -> Iterator[OutputSet]:
    """Write files into ``out`` as one set (see the module docstring for the guarantee).

    >>> with output_set("runs/x", ["model.pt", "report.json"]) as files:
    ...     torch.save(model.state_dict(), files.path("model.pt"))
    ...     files.path("report.json").write_text("{}")

    ``names``, if given, are the files the set must hold; otherwise it holds whatever was
    written. Files of the previous set that the new one lacks are removed. Any exception in
    the block leaves ``out`` as it was; the staging folder is always removed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = None if names is None else tuple(dict.fromkeys(_check_name(n) for n in names))
    old = read_manifest(out)
    _clean_stale(out, set(names or ()) | set((old or {}).get("files", ())))
    staging = Path(tempfile.mkdtemp(dir=out, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
    lock = None
    try:
        lock = _lock(staging)
        files = OutputSet(out, staging, names)
        yield files
        _commit(files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def read_manifest(out: str | os.PathLike) -> dict | None:
    """``out``'s manifest.json, or None if it is missing or not an autoprune manifest."""
    try:
        data = read_json(Path(out) / MANIFEST)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), dict):
        return None
    return data


def check_output_set(out: str | os.PathLike) -> list[str]:
    """Problems with the output set in ``out`` (empty: complete, every file as its run wrote it)."""
    out = Path(out)
    if not out.is_dir():
        return [f"{out} is not a folder"]
    if not (out / MANIFEST).is_file():
        return [f"{out} has no {MANIFEST}: its outputs are incomplete (a write was interrupted) "
                "or were written before autoprune kept manifests"]
    manifest = read_manifest(out)
    if manifest is None:
        return [f"{out / MANIFEST} is unreadable or not an autoprune manifest ({MANIFEST_FORMAT})"]
    problems = []
    for name, want in manifest["files"].items():
        try:
            _check_name(name)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if not (out / name).is_file():
            problems.append(f"{name} is missing")
        elif not isinstance(want, dict) or _digest(out / name) != {"size": want.get("size"),
                                                                    "sha256": want.get("sha256")}:
            problems.append(f"{name} is not the file of run {manifest.get('run_id')} (size or SHA-256 differs)")
    return problems


def _check_name(name: str) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..", MANIFEST) or name.startswith(".")
            or "/" in name or os.sep in name or (os.altsep and os.altsep in name)):
        raise ValueError(f"output file name {name!r}: use a plain, visible file name other than {MANIFEST}")
    return name


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def _commit(files: OutputSet) -> None:
    """Manifest into staging, then: old manifest out, files in, old-only files out, manifest in."""
    out, staging = files.out, files.staging
    names = files.names or tuple(sorted(p.name for p in staging.iterdir()
                                        if p.is_file() and not p.name.startswith(".")))
    missing = [n for n in names if not (staging / n).is_file()]
    if missing:
        raise AutopruneError(f"the outputs for {out} lack {', '.join(missing)}; nothing was replaced")
    manifest = {"format": MANIFEST_FORMAT, "run_id": uuid.uuid4().hex,
                "created": datetime.now().astimezone().isoformat(timespec="seconds"),
                "files": {n: _digest(staging / n) for n in names}}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    old = read_manifest(out)
    files.replaced = _written_at(out, old) if "model.pt" in names else None
    if files.replaced:
        _log.info("replacing the model in %s (from a run of %s)", out, files.replaced)
    stale = [n for n in (old or {}).get("files", ()) if n not in names and _is_plain(n)]

    def move(name: str) -> None:
        if (staging / name).exists():  # not yet moved (a retry after Ctrl-C may find it moved)
            os.replace(staging / name, out / name)

    steps = [lambda: (out / MANIFEST).unlink(missing_ok=True)]
    steps += [lambda n=n: move(n) for n in names]
    steps += [lambda n=n: (out / n).unlink(missing_ok=True) for n in stale]
    steps += [lambda: move(MANIFEST)]
    _finish_steps(steps)
    files.manifest = manifest


def _finish_steps(steps) -> None:
    """Run idempotent ``steps``; a Ctrl-C waits until they are all done, then takes effect.

    A SIGINT is held by a recording handler (main thread); a KeyboardInterrupt raised all
    the same (another thread's signal, a test) retries the step once.
    """
    held: list[int] = []
    previous = _hold_sigint(held)
    interrupted, i = None, 0
    try:
        while i < len(steps):
            try:
                steps[i]()
            except KeyboardInterrupt as exc:
                if interrupted is not None:  # a second Ctrl-C: stop here (no manifest: incomplete)
                    raise
                interrupted = exc
                continue  # retry the same step
            i += 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted is not None:
        raise interrupted
    if held and previous is not None:
        previous(signal.SIGINT, None)  # the default handler raises KeyboardInterrupt


def _hold_sigint(held: list[int]):
    """Record SIGINTs in ``held`` instead of acting on them; the handler to restore, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if not callable(previous):  # SIG_IGN / SIG_DFL / not set from Python: leave it alone
        return None
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    return previous


def _is_plain(name: str) -> bool:
    try:
        _check_name(name)
    except ValueError:
        return False
    return True


def _written_at(out: Path, old: dict | None) -> str | None:
    """When the model in ``out`` was written (its manifest's date, else the file's), or None."""
    model = out / "model.pt"
    if not model.is_file():
        return None
    if old and "model.pt" in old["files"]:
        try:
            return datetime.fromisoformat(old["created"]).strftime("%Y-%m-%d %H:%M")
        except (KeyError, TypeError, ValueError):
            pass
    return datetime.fromtimestamp(model.stat().st_mtime).strftime("%Y-%m-%d %H:%M")


def _lock(staging: Path) -> int | None:
    """Hold an advisory lock on the staging folder while this process writes it."""
    if fcntl is None:
        return None
    fd = os.open(staging, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _clean_stale(out: Path, names: set[str]) -> None:
    """Remove abandoned staging folders and old ``.NAME.*`` temporary files of ``names``."""
    started = _process_start()
    for entry in os.scandir(out):
        if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
            if _abandoned(Path(entry.path)):
                shutil.rmtree(entry.path, ignore_errors=True)
            continue
        temp = TEMP_NAME.match(entry.name)
        if temp and temp["name"] in names | {MANIFEST} and entry.is_file(follow_symlinks=False):
            try:  # older than this process: its writer is gone (a newer one may be live)
                if entry.stat().st_mtime < started - 2:
                    os.unlink(entry.path)
            except OSError:
                pass


def _abandoned(staging: Path) -> bool:
    """Nobody holds the folder's lock and its writer is dead (or the folder is over an hour old)."""
    try:
        age = time.time() - staging.stat().st_mtime
    except OSError:
        return False
    if fcntl is None:
        return age > 24 * 3600
    pid = re.match(rf"{re.escape(STAGING_PREFIX)}(\d+)-", staging.name)
    try:
        fd = os.open(staging, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its writer is at work
        return pid is None or not _alive(int(pid[1])) or age > _STALE_AFTER_S
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process
        return True
    return True


def _process_start() -> float:
    """This process's start time (Linux /proc), else when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return _LOADED
