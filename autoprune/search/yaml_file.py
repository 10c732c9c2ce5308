"""Reading a search-space file: a path or a packaged name → its parsed YAML, safely and bounded.

The file is UTF-8 text of at most :data:`MAX_FILE_BYTES`, parsed by a ``yaml.SafeLoader`` that
refuses anchors and aliases (a few hundred bytes of them expand to billions of values), nesting
deeper than :data:`MAX_DEPTH`, more than :data:`MAX_NODES` values and a key given twice in one
mapping. Every failure is one :class:`~.space_error.SearchSpaceError` line naming the file.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

from ..errors import clip
from .space_error import SearchSpaceError, did_you_mean, key_name

__all__ = ["MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "packaged", "read_yaml", "resolve"]

MAX_FILE_BYTES = 1 << 20   # a search space is a small text file
MAX_DEPTH = 8              # YAML nesting (the files need 3)
MAX_NODES = 10_000         # YAML values in one file (the packaged files hold about 50)
_PACKAGE_DIR = "search_spaces"


def packaged() -> list[str]:
    """Names of the search spaces shipped in ``autoprune/search_spaces``."""
    root = importlib.resources.files("autoprune") / _PACKAGE_DIR
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve(path_or_name: "str | Path") -> tuple[Path, str, str]:
    """(file, name, label for errors): a path to a file, else a packaged name, given
    bare (``resnet_cifar``), with ``.yaml``, or as ``search_spaces/NAME.yaml``."""
    p = Path(path_or_name)
    if p.is_file():
        return p, p.stem, str(path_or_name)
    names = packaged()
    stem = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if (len(p.parts) == 1 or p.parent.name == _PACKAGE_DIR) and stem in names:
        root = importlib.resources.files("autoprune") / _PACKAGE_DIR
        return Path(str(root / f"{stem}.yaml")), stem, f"{stem}.yaml"
    what = ("is a directory, not a file" if p.is_dir() else
            "is not a regular file" if p.exists() else "no such file")
    raise SearchSpaceError(f"{path_or_name}: {what}; give a YAML file or a packaged search space "
                           f"({', '.join(names)}){did_you_mean(names, stem)}")


class _Refused(Exception):
    """YAML that parses but that a search space refuses (aliases, depth, repeated keys)."""

    def __init__(self, mark, text: str) -> None:
        super().__init__(text)
        self.mark, self.text = mark, text


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors and aliases (an alias bomb of a few hundred
    bytes expands to billions of values), nested at most :data:`MAX_DEPTH` deep, with at
    most :data:`MAX_NODES` values (it stops reading there: the pure-Python parser takes
    seconds for a megabyte of short values), and refusing a key given twice in one
    mapping (safe_load silently keeps the last)."""

    _depth = 0
    _nodes = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(event.start_mark, "YAML anchors and aliases (&name, *name) are not "
                           "allowed in search spaces; write the values out")
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_NODES:
                raise _Refused(event.start_mark, f"holds more than {MAX_NODES:,} values; a search "
                               "space needs a few dozen")
            if self._depth > MAX_DEPTH + 1:  # +1: the document's top-level node
                raise _Refused(event.start_mark, f"nested more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: set[str] = set()
        if isinstance(node, yaml.MappingNode):
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in seen:
                        raise _Refused(key.start_mark, f"key {key_name(key.value)!r} appears twice "
                                       "in one mapping")
                    seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path, label: str) -> str:
    """The file's text: at most :data:`MAX_FILE_BYTES`, UTF-8, no NUL bytes."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SearchSpaceError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_FILE_BYTES:
        raise SearchSpaceError(f"{label}: is larger than {MAX_FILE_BYTES >> 20} MiB; a search space "
                               "is a small YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SearchSpaceError(f"{label}: is not a UTF-8 text YAML file (byte "
                               f"0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8)") from None
    if "\x00" in text:
        raise SearchSpaceError(f"{label}: is not a UTF-8 text YAML file (it holds NUL bytes at "
                               f"offset {text.index(chr(0))})")
    return text


def _where(mark) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""


def read_yaml(path: Path, label: str) -> object:
    """The file's parsed YAML document (plain dicts, lists and scalars; None if empty);
    SearchSpaceError naming ``label`` if it cannot be read or is refused."""
    text = _read_text(path, label)
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise SearchSpaceError(f"{label}: {_where(exc.mark)}{exc.text}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SearchSpaceError(f"{label}: {_where(mark)}not valid YAML ({clip(problem, 100)}); "
                               "regexes are safest in single quotes") from None
    except (ValueError, OverflowError, RecursionError) as exc:  # e.g. int('9' * 5000), a bad date
        raise SearchSpaceError(f"{label}: a value is not valid YAML ({type(exc).__name__}: "
                               f"{clip(str(exc), 100)})") from None
