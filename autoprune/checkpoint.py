"""Checkpoint files: atomic single-file writes, safe reads and baseline checkpoints.

Everything is read with ``torch.load(weights_only=True)``; files are written to a
temporary sibling (``.NAME.XXXXXXXX``, matched by :data:`TEMP_NAME`) and renamed, so an
interrupted run never leaves half a file. A run's outputs written together as one set
(manifest last) are :mod:`autoprune.outputs`' job.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from . import models
from .errors import AutopruneError, CheckpointError, short

TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")
"""The temporary files of :func:`atomic_save` and :func:`atomic_write_text` (``.NAME.XXXXXXXX``,
mkstemp's names): ``name`` is the file they replace."""


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str):
    """A file object on a temporary sibling of ``path`` (a name of its own: writers of the same
    path at once do not collide), renamed over it on success."""
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
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically (same temporary-file-and-rename scheme)."""
    with atomic_open(path, "w") as f:
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
        if "weights only load failed" in str(exc).lower():
            raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data "
                                  "(code could run on loading), so it is refused; autoprune writes "
                                  "only tensors, numbers, strings, lists and dicts") from None
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or not a "
                              f"torch file): {type(exc).__name__}") from exc
    if not isinstance(data, dict) or "state_dict" not in data:
        raise CheckpointError(f"checkpoint {path} has no state_dict; expected one written by "
                              "autoprune (train, prune or Plan.save)")
    return data


def load_weights(model: nn.Module, state_dict: Mapping, path: str | os.PathLike) -> nn.Module:
    """load_state_dict, turning key/shape mismatches into one short CheckpointError line."""
    arch = getattr(model, "autoprune_arch", {}).get("name", type(model).__name__)
    if not isinstance(state_dict, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise CheckpointError(f"checkpoint {path}: state_dict must map parameter names to tensors, "
                              f"got {short(state_dict)}")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    problems = [f"{len(keys)} {what}, e.g. {short(keys[0])}" for keys, what in
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
    arch, meta = _checked_arch(data.get("arch"), path), _checked_meta(data.get("meta"), path)
    try:
        model = models.create(**arch)
    except AutopruneError as exc:  # unknown name, bad kwargs, too many classes or parameters
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return load_weights(model, data["state_dict"], path), meta


ARCH_KEYS = ("name", "num_classes", "kwargs")


def _checked_arch(arch: object, path) -> dict:
    """``arch`` if it is a dict naming a model (the rest is checked by models.create)."""
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not arch["name"].strip():
        raise CheckpointError(f"{path} names no architecture (arch must be a dict with a model name, "
                              f"got {short(arch)}); it was not written by autoprune")
    extra = [k for k in arch if k not in ARCH_KEYS]
    if extra:
        raise CheckpointError(f"checkpoint {path}: arch has unknown key {short(extra[0])}; expected "
                              f"{', '.join(ARCH_KEYS)}")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"checkpoint {path}: arch kwargs must be a dict of named model arguments, "
                              f"got {short(kwargs)}")
    return arch


def _checked_meta(meta: object, path) -> dict:
    """``meta`` (a dict; absent: empty) with its ``data`` and ``input_shape``, when present, checked."""
    from .limits import check_input_shape

    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: meta must be a dict, got {type(meta).__name__} "
                              f"{short(meta)}")
    data = meta.get("data")
    if data is not None:
        if not isinstance(data, dict):
            raise CheckpointError(f"checkpoint {path}: meta.data must be a dict naming the dataset, "
                                  f"got {type(data).__name__} {short(data)}")
        if not isinstance(data.get("name", ""), str):
            raise CheckpointError(f"checkpoint {path}: meta.data.name must be a dataset name, got "
                                  f"{short(data['name'])}")
    if meta.get("input_shape") is not None:
        try:
            check_input_shape(meta["input_shape"], "meta.input_shape")
        except AutopruneError as exc:
            raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return dict(meta)
