"""autoprune: budgeted structured pruning of CNNs.

>>> import autoprune as ap
>>> model = ap.models.create("resnet20", num_classes=10)
>>> space = ap.Space(model, torch.randn(1, 3, 16, 16))
>>> widths = space.fit({u.name: 0.5 for u in space.units}, "flops<=50%")
>>> small = ap.select(space, widths).apply(model)
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

__all__ = [
    "AutopruneError", "Budget", "BudgetError", "CheckpointError", "Cost", "DataError",
    "ModelError", "Plan", "fpar_attention", "fpar_scores", "wsp_plan", "wsp_widths", "Space", "Unit", "calibrate", "criteria", "data", "fvcore_cost", "load",
    "models", "select",
]
