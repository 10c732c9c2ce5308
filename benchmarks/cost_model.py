"""How much cheaper the analytic cost model is than tracing the pruned network.

For CIFAR resnet56 (1x3x32x32) and torchvision resnet50 (1x3x224x224) this prints
the median time of one analytic ``space.cost(widths)``, of one
``space.fit(ratios, "flops<=50%")`` and of one fvcore trace of the physically
pruned model, the ratios between them, and whether the analytic cost equals
fvcore's count on that pruned model.

Targets: analytic cost at least 1000x faster than a trace; fit within 50 ms on
ResNet-50.

    python benchmarks/cost_model.py
"""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch

import autoprune as ap
from timing import median_time

CASES = (("resnet56", 10, (1, 3, 32, 32)), ("resnet50", 1000, (1, 3, 224, 224)))
BUDGET = "flops<=50%"


def calls_for(fn, seconds: float = 1.0, cap: int = 10_000) -> int:
    """How many calls of ``fn`` fit in about ``seconds`` (at least 20)."""
    once = median_time(fn, 5)
    return int(min(cap, max(20, seconds / max(once, 1e-7))))


def fmt(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:8.2f} {unit}"
    return f"{seconds * 1e9:8.2f} ns"


def bench(name: str, num_classes: int, shape: tuple[int, ...], rng: np.random.Generator) -> bool:
    torch.manual_seed(0)
    model = ap.models.create(name, num_classes=num_classes).eval()
    x = torch.zeros(shape)
    start = time.perf_counter()
    space = ap.Space(model, x)
    setup = time.perf_counter() - start

    ratios = {u.name: float(rng.uniform(0.0, 0.8)) for u in space.units}
    widths = space.fit(ratios, BUDGET)
    pruned = ap.select(space, widths).apply(model)

    t_cost = median_time(lambda: space.cost(widths), calls_for(lambda: space.cost(widths)))
    fits = [{u.name: float(rng.uniform(0.0, 0.8)) for u in space.units} for _ in range(20)]
    it = iter(fits)
    t_fit = median_time(lambda: space.fit(next(it), BUDGET), len(fits))
    t_trace = median_time(lambda: ap.fvcore_cost(pruned, x), 3)

    analytic, traced = space.cost(widths), ap.fvcore_cost(pruned, x)
    base = space.cost()
    same = analytic == traced
    print(f"{name}  input {'x'.join(map(str, shape))}  {len(space.units)} units  "
          f"(Space built in {setup:.1f} s)")
    print(f"  base        FLOPs {base.flops:>14,}  params {base.params:>12,}")
    print(f"  pruned      FLOPs {analytic.flops:>14,}  params {analytic.params:>12,}  "
          f"({analytic.flops / base.flops:.2%} of FLOPs, budget {BUDGET})")
    print(f"  fvcore      FLOPs {traced.flops:>14,}  params {traced.params:>12,}  "
          f"analytic == fvcore: {same}")
    print(f"  space.cost(widths)      {fmt(t_cost)}")
    print(f"  space.fit(ratios)       {fmt(t_fit)}   (median of {len(fits)} random shapes)")
    print(f"  fvcore trace (pruned)   {fmt(t_trace)}   (median of 3)")
    print(f"  trace / cost   {t_trace / t_cost:>12,.0f}x   (target >= 1000x: "
          f"{'ok' if t_trace / t_cost >= 1000 else 'MISSED'})")
    fit_ok = name != "resnet50" or t_fit <= 0.050
    print(f"  trace / fit    {t_trace / t_fit:>12,.1f}x" +
          (f"   (fit target <= 50 ms: {'ok' if fit_ok else 'MISSED'})" if name == "resnet50" else ""))
    print()
    return same and t_trace / t_cost >= 1000 and fit_ok


def main() -> int:
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads\n")
    rng = np.random.default_rng(0)
    results = [bench(name, k, shape, rng) for name, k, shape in CASES]
    print("all targets met" if all(results) else "SOME TARGETS MISSED")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
