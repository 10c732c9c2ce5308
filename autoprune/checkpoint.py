"""Checkpoint files: atomic writes, safe reads, and baseline (unpruned) checkpoints.

Everything is read with ``torch.load(weights_only=True)``; files are written to a
temporary name and renamed, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import models
from .errors import CheckpointError


@contextmanager
def _atomic(path: str | os.PathLike, mode: str):
    """A file object on a temporary sibling of ``path``, renamed over it on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would have given
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """torch.save to a temporary file, then rename: an interruption never leaves half a file."""
    with _atomic(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (same temporary-file-and-rename scheme)."""
    with _atomic(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    """``obj`` as indented JSON, atomically; numpy scalars and tensors become numbers/lists."""
    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load with ``weights_only=True``; CheckpointError for missing or damaged files."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a "
                              f"torch file): {type(exc).__name__}") from exc
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"checkpoint {path} has no state_dict; expected one written by "
                              "autoprune (train, prune or Plan.save)")
    return data


def load_weights(model: nn.Module, state_dict: Mapping, path: str | os.PathLike) -> nn.Module:
    """load_state_dict, turning key/shape mismatches into one short CheckpointError line."""
    arch = getattr(model, "autoprune_arch", {}).get("name", type(model).__name__)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    problems = [f"{len(keys)} {what}, e.g. {keys[0]}" for keys, what in
                ((missing, "missing keys"), (extra, "unexpected keys"), (shapes, "shape mismatches"))
                if keys]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict(state_dict)
    return model


def save_baseline(path: str | os.PathLike, model: nn.Module, **meta) -> None:
    """Save an unpruned registry model with its architecture and ``meta`` (accuracy, data...)."""
    atomic_save({"arch": models.arch_of(model), "state_dict": model.state_dict(), "meta": meta}, path)


def load_baseline(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """The model saved by :func:`save_baseline` (rebuilt from the registry) and its meta."""
    data = read_checkpoint(path)
    if "plan" in data:
        raise CheckpointError(f"{path} is a pruned model; load it with autoprune.load")
    if not data.get("arch"):
        raise CheckpointError(f"{path} names no architecture; it was not written by autoprune")
    model = models.create(**data["arch"])
    return load_weights(model, data["state_dict"], path), dict(data.get("meta", {}))
