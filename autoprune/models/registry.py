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

from torch import nn

from ..errors import ModelError
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
    key = str(name).strip().lower()
    if key in CIFAR_MODELS:
        model, used = _create_cifar(key, num_classes, kwargs)
    elif key.startswith(TORCHVISION_PREFIX) and key[len(TORCHVISION_PREFIX):] in _torchvision_names():
        model, used = _create_torchvision(key[len(TORCHVISION_PREFIX):], num_classes, kwargs)
    elif key in _torchvision_names():
        model, used = _create_torchvision(key, num_classes, kwargs)
    else:
        raise ModelError(_unknown_message(str(name)))
    model.autoprune_arch = {"name": key, "num_classes": num_classes, "kwargs": used}
    return model


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
        raise ModelError(f"model {name!r}: 'kwargs' must be a dict of model arguments, got {nested!r}")
    clash = sorted(set(nested) & set(kwargs))
    if clash:
        raise ModelError(f"model {name!r}: arguments {clash} given both directly and in 'kwargs'")
    return {**nested, **kwargs}


def _check_num_classes(name: str, num_classes: Any) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model {name!r}: num_classes must be a positive integer, got {num_classes!r}")


def _check_json(name: str, kwargs: dict[str, Any]) -> None:
    """Model kwargs end up in checkpoints and reports, so they must be plain JSON."""
    if "weights" in kwargs:
        raise ModelError(
            f"model {name!r}: 'weights' is not supported; autoprune creates randomly initialised "
            "models and never downloads weights (load a checkpoint instead)"
        )
    try:
        json.dumps(kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(
            f"model {name!r}: keyword arguments must be JSON-serialisable (numbers, strings, "
            f"lists, dicts), got {kwargs!r} ({exc})"
        ) from None


def _create_cifar(name: str, num_classes: int, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    builder = CIFAR_MODELS[name]
    valid = [p for p in inspect.signature(builder).parameters if p != "num_classes"]
    for key in kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ModelError(
                f"model {name!r} has no argument {key!r}{hint}; valid arguments: "
                f"num_classes, {', '.join(valid)}"
            )
    try:
        return builder(num_classes=num_classes, **kwargs), dict(kwargs)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {name!r}: invalid arguments {kwargs!r}: {exc}") from None


def _create_torchvision(name: str, num_classes: int, kwargs: dict[str, Any]) -> tuple[nn.Module, dict]:
    import torchvision

    used = {**_TORCHVISION_DEFAULTS.get(name, {}), **kwargs}
    try:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **used)
    except TypeError as exc:
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        what = f"argument {bad.group(1)!r}" if bad else f"arguments {kwargs!r}"
        raise ModelError(
            f"torchvision model {name!r} does not accept {what} ({exc}); "
            f"see torchvision.models.{name} for its arguments"
        ) from None
    except ValueError as exc:
        raise ModelError(f"torchvision model {name!r}: invalid arguments {kwargs!r}: {exc}") from None
    return model, used


def _unknown_message(name: str) -> str:
    candidates = available() + [TORCHVISION_PREFIX + n for n in _torchvision_names()]
    close = difflib.get_close_matches(name.strip().lower(), candidates, n=5, cutoff=0.5)
    suggestion = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"unknown model {name!r}{suggestion} "
        "(call autoprune.models.available() for the full list of names)"
    )
