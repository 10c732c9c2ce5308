"""autoprune: budgeted structured pruning of CNNs.

>>> import autoprune as ap
>>> model = ap.models.create("resnet20", num_classes=10)
>>> space = ap.Space(model, torch.randn(1, 3, 16, 16))
>>> widths = space.fit({u.name: 0.5 for u in space.units}, "flops<=50%")
>>> small = ap.select(space, widths).apply(model)
>>> result = ap.prune(model, ap.data.load("digits"), "flops<=50%", method="greedy")

``ap.prune`` and ``ap.compare`` are the functions; their modules stay importable as
``importlib.import_module("autoprune.prune")`` (and ``from autoprune.prune import ...``).
"""

import warnings

# torch-pruning imports torch.jit.script, which torch 2.x marks deprecated on import.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)

from . import criteria, data, models  # noqa: E402
from .calibrate import calibrate  # noqa: E402
from .budget import Budget
from .cost import Cost, fvcore_cost
from .errors import AutopruneError, BudgetError, CheckpointError, DataError, ModelError
from .plan import Plan, load, select
from .space import Space, Unit
from .wsp import wsp_plan, wsp_widths
from .criteria.fpar import attention as fpar_attention, fpar_scores
from . import search  # noqa: E402
from .prune import Result, prune  # noqa: E402
from .compare import compare, proxy_fidelity  # noqa: E402

__all__ = [
    "AutopruneError", "Budget", "BudgetError", "CheckpointError", "Cost", "DataError",
    "ModelError", "Plan", "Result", "Space", "Unit", "calibrate", "compare", "criteria", "data",
    "fpar_attention", "fpar_scores", "fvcore_cost", "load", "models", "proxy_fidelity", "prune",
    "search", "select", "wsp_plan", "wsp_widths",
]
