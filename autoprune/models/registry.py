"""Model registry: autoprune's CIFAR nets plus every torchvision classifier, by name.

Models are always randomly initialised (nothing is downloaded). Each created model
carries ``autoprune_arch`` = ``{"name", "num_classes", "kwargs"}``, a plain JSON-able
dict from which :func:`create` rebuilds the same architecture (used by checkpoints).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import re
from functools import lru_cache
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ModelError, short
from ..limits import MAX_CLASSES, check_fits
from . import cifar

TORCHVISION_PREFIX = "torchvision/"

CIFAR_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": cifar.resnet20,
    "resnet32": cifar.resnet32,
    "resnet56": cifar.resnet56,
    "resnet110": cifar.resnet110,
    "vgg16_bn": cifar.vgg16_bn,
}

# Auxiliary heads return tuples in training mode and break pruned fine-tuning.
_TORCHVISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


@lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    """Classification model names torchvision registers (cached: the lookup is slowish)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def available() -> list[str]:
    """Names :func:`create` accepts: CIFAR nets, torchvision nets, ``torchvision/NAME`` for shadowed ones."""
    tv = _torchvision_names()
    shadowed = [TORCHVISION_PREFIX + n for n in tv if n in CIFAR_MODELS]
    return list(CIFAR_MODELS) + [n for n in tv if n not in CIFAR_MODELS] + shadowed


def create(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model by name; ``create(**arch_of(m))`` rebuilds ``m``."""
    kwargs = _merge_nested_kwargs(name, kwargs)
    _check_num_classes(name, num_classes)
    _check_json(name, kwargs)
    if not isinstance(name, str):
        raise ModelError(f"model name must be a string, got {short(name)}")
    key = name.strip().lower()
    if key in CIFAR_MODELS:
        build = lambda: _create_cifar(key, num_classes, kwargs)  # noqa: E731
    elif key.startswith(TORCHVISION_PREFIX) and key[len(TORCHVISION_PREFIX):] in _torchvision_names():
        build = lambda: _create_torchvision(key[len(TORCHVISION_PREFIX):], num_classes, kwargs)  # noqa: E731
    elif key in _torchvision_names():
        build = lambda: _create_torchvision(key, num_classes, kwargs)  # noqa: E731
    else:
        raise ModelError(_unknown_message(name))
    if kwargs:  # default architectures are bounded by the num_classes cap; arguments may not be
        _check_size(key, num_classes, kwargs, build)
    model, used = build()
    model.autoprune_arch = {"name": key, "num_classes": num_classes, "kwargs": used}
    return model


def _check_size(name: str, num_classes: int, kwargs: dict, build) -> None:
    """Build on the ``meta`` device (no memory, no init cost) and refuse parameters that
    cannot fit in the memory free now, before the real build tries to allocate them."""
    try:
        with torch.device("meta"):
            probe, _ = build()
    except ModelError:
        raise
    except Exception:  # noqa: BLE001 - a builder that cannot run on meta: no estimate
        return
    count = sum(t.numel() for t in [*probe.parameters(), *probe.buffers()])
    args = f"num_classes={num_classes}" + (f", {short(kwargs)}" if kwargs else "")
    check_fits(4 * count, f"model {name!r} ({args}) with {count:,} parameters",
               "use fewer classes or smaller model arguments")


def arch_of(model: nn.Module) -> dict[str, Any]:
    """The ``{"name", "num_classes", "kwargs"}`` dict a model was created with (a copy)."""
    arch = getattr(model, "autoprune_arch", None)
    if not isinstance(arch, dict):
        raise ModelError(
            f"{type(model).__name__} has no autoprune_arch attribute: only models built with "
            "autoprune.models.create(name, ...) can be described and rebuilt; "
            "see autoprune.models.available() for the names"
        )
    return copy.deepcopy(arch)


def _merge_nested_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Accept ``create(**arch)``, where the model kwargs arrive nested under ``kwargs``."""
    nested = kwargs.pop("kwargs", None)
    if nested is None:
        return kwargs
    if not isinstance(nested, dict):
        raise ModelError(f"model {short(name)}: 'kwargs' must be a dict of model arguments, got {short(nested)}")
    clash = sorted(set(nested) & set(kwargs))
    if clash:
        raise ModelError(f"model {short(name)}: arguments {short(clash)} given both directly and in 'kwargs'")
    return {**nested, **kwargs}


def _check_num_classes(name: str, num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 1 <= num_classes <= MAX_CLASSES:
        raise ModelError(f"model {short(name)}: num_classes must be an integer from 1 to {MAX_CLASSES}, "
                         f"got {short(num_classes)}")


def _check_json(name: str, kwargs: dict[str, Any]) -> None:
    """Model kwargs end up in checkpoints and reports, so they must be plain JSON."""
    if "weights" in kwargs:
        raise ModelError(
            f"model {short(name)}: 'weights' is not supported; autoprune creates randomly initialised "
            "models and never downloads weights (load a checkpoint instead)"
        )
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"model {short(name)}: keyword arguments must be JSON-serialisable (numbers, strings, "
            f"lists, dicts), got {short(kwargs)} ({exc})"
        ) from None


def _create_cifar(name: str, num_classes: int, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    builder = CIFAR_MODELS[name]
    valid = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelError(
                f"model {name!r} has no argument {short(key)}{hint}; valid arguments: "
                f"num_classes, {', '.join(valid)}"
            )
    try:
        return builder(num_classes=num_classes, **kwargs), dict(kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {name!r}: invalid arguments {short(kwargs)}: {short(str(exc), 200)}") from None


def _create_torchvision(name: str, num_classes: int, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    import torchvision

    used = {**_TORCHVISION_DEFAULTS.get(name, {}), **kwargs}
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **used)
    except TypeError as exc:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        what = f"argument {short(bad.group(1))}" if bad else f"arguments {short(kwargs)}"
        raise ModelError(
            f"torchvision model {name!r} does not accept {what} ({short(str(exc), 200)}); "
            f"see torchvision.models.{name} for its arguments"
        ) from None
    except ValueError as exc:
        raise ModelError(f"torchvision model {name!r}: invalid arguments {short(kwargs)}: "
                         f"{short(str(exc), 200)}") from None
    return model, used


def _unknown_message(name: str) -> str:
    candidates = available() + [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    close = difflib.get_close_matches(name[:100].strip().lower(), candidates, n=5, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown model {short(name)}{suggestion} "
        "(call autoprune.models.available() for the full list of names)"
    )
