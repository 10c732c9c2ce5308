"""autoprune: budgeted structured pruning of CNNs.

>>> import autoprune as ap
>>> model = ap.models.create("resnet20", num_classes=10)
>>> space = ap.Space(model, torch.randn(1, 3, 16, 16))
>>> widths = space.fit({u.name: 0.5 for u in space.units}, "flops<=50%")
>>> small = ap.select(space, widths).apply(model)
>>> result = ap.prune(model, ap.data.load("digits"), "flops<=50%", method="greedy")

``ap.prune`` and ``ap.compare`` are the functions; their modules stay importable as
``importlib.import_module("autoprune.prune")`` (and ``from autoprune.prune import ...``).

Names are loaded on first use (PEP 562 ``__getattr__``): ``import autoprune`` imports
neither torch nor anything else heavy, so the command line can answer a Ctrl-C during
those imports with one line (:mod:`autoprune.__main__`).
"""

import importlib
import sys
import types
import warnings

# torch-pruning imports torch.jit.script, which torch 2.x marks deprecated on import.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

_SOURCES = {  # public name -> (submodule, attribute; None: the submodule itself)
    "criteria": ("criteria", None), "data": ("data", None), "models": ("models", None),
    "search": ("search", None), "calibrate": ("calibrate", "calibrate"), "Budget": ("budget", "Budget"),
    "Cost": ("cost", "Cost"), "fvcore_cost": ("cost", "fvcore_cost"),
    "AutopruneError": ("errors", "AutopruneError"), "BudgetError": ("errors", "BudgetError"),
    "CheckpointError": ("errors", "CheckpointError"), "DataError": ("errors", "DataError"),
    "ModelError": ("errors", "ModelError"), "OptionError": ("errors", "OptionError"), "Plan": ("plan", "Plan"), "load": ("plan", "load"),
    "select": ("plan", "select"), "Space": ("space", "Space"), "Unit": ("space", "Unit"),
    "wsp_plan": ("wsp", "wsp_plan"), "wsp_widths": ("wsp", "wsp_widths"),
    "fpar_attention": ("criteria.fpar", "attention"), "fpar_scores": ("criteria.fpar", "fpar_scores"),
    "methods": ("methods", None), "Result": ("pipeline", "Result"), "prune": ("prune", "prune"), "compare": ("compare", "compare"),
    "proxy_fidelity": ("fidelity", "proxy_fidelity"),
}
# Functions named like their module: importing the module must not rebind the name to it.
_FUNCTIONS = frozenset(name for name, (module, attr) in _SOURCES.items() if attr == module == name)

__all__ = [
    "AutopruneError", "Budget", "BudgetError", "CheckpointError", "Cost", "DataError",
    "ModelError", "OptionError", "Plan", "Result", "Space", "Unit", "calibrate", "compare", "criteria", "data",
    "fpar_attention", "fpar_scores", "fvcore_cost", "load", "methods", "models", "proxy_fidelity", "prune",
    "search", "select", "wsp_plan", "wsp_widths",
]


def __getattr__(name: str):
    if name in _SOURCES:
        module, attr = _SOURCES[name]
        value = importlib.import_module(f"{__name__}.{module}")
        if attr is not None:
            value = getattr(value, attr)
        globals()[name] = value
        return value
    if not name.startswith("__"):  # any other submodule, e.g. autoprune.evaluate
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _FUNCTIONS and isinstance(value, types.ModuleType):
            return  # the import system binding autoprune.prune (the module) on the package
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
