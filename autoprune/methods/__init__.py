"""Width methods: one module each behind :class:`~.base.WidthMethod`, one registry.

>>> autoprune.methods.available()            # the names, in registration order
>>> result = autoprune.methods.get("uniform").widths(space, budget, Context(None, None, space, budget))
>>> result.widths                            # {unit: kept channels}

Adding a method is one module (a :class:`WidthMethod` subclass) plus its module's name
in ``BUILTIN`` below; :func:`register` adds one from outside the package.
"""

from __future__ import annotations

import importlib

from ..errors import OptionError, short
from .base import Context, WidthMethod, WidthResult

_REGISTRY: dict[str, type[WidthMethod]] = {}


def register(cls: type[WidthMethod]) -> type[WidthMethod]:
    """Register width method ``cls`` under ``cls.name`` (usable as a class decorator)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise OptionError(f"a width method needs a name, got {short(name)}")
    if _REGISTRY.get(name, cls) is not cls:
        raise OptionError(f"width method {name!r} is already registered ({_REGISTRY[name].__qualname__}); "
                             "choose another name")
    _REGISTRY[name] = cls
    return cls


def available() -> tuple[str, ...]:
    """Names of the registered width methods, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> WidthMethod:
    """An instance of width method ``name``; AutopruneError listing :func:`available` if unknown."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise OptionError(f"unknown method {short(name)}; choose one of {', '.join(available())}")
    return _REGISTRY[name]()


BUILTIN = ("uniform", "greedy", "wsp", "tp_global", "search", "search_arms", "selfgroup", "fastnas")
"""The modules of this package holding the built-in methods, registered in this order."""


def _register_module(module_name: str) -> None:
    """Register the WidthMethod subclass(es) defined in ``module_name`` of this package."""
    module = importlib.import_module(f"{__name__}.{module_name}")
    for value in vars(module).values():
        if isinstance(value, type) and issubclass(value, WidthMethod) and value.__module__ == module.__name__:
            register(value)


for _module_name in BUILTIN:
    _register_module(_module_name)

__all__ = ["Context", "WidthMethod", "WidthResult", "available", "get", "register"]
