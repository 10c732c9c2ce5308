"""The error every search-space check raises, and the two ways its messages quote a user.

A :class:`SearchSpaceError` is one line naming the file, the key and what is allowed. A
user's mapping key appears in it cut short (:func:`key_name`), and a misspelt choice gets a
"did you mean" (:func:`did_you_mean`). The lowest module of the search-space modules
(:mod:`.space` → :mod:`.validate` → :mod:`.samplers`, :mod:`.yaml_file` → here).
"""

from __future__ import annotations

import difflib
from typing import Sequence

from ..errors import AutopruneError, clip, short

__all__ = ["SearchSpaceError", "did_you_mean", "key_name"]


class SearchSpaceError(AutopruneError, ValueError):
    """A search-space file is missing or invalid: the message names the file, the key
    and what is allowed."""


def key_name(key: object) -> str:
    """A user's mapping key as it may appear in a key path (long keys cut)."""
    return clip(key, 40) if isinstance(key, str) else short(key, 40)


def did_you_mean(options: Sequence[str], value: object) -> str:
    """``"; did you mean 'x'?"`` for the option closest to ``value``, or ``""``."""
    if not isinstance(value, str) or len(value) > 100:
        return ""
    near = difflib.get_close_matches(value, list(options), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""
