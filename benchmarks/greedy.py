"""DI greedy optimizer wall time per step on ResNet-56 (criterion mode, 0.5% steps).

Scores are L1 magnitudes (the step cost does not depend on which criterion made
them); the analytic cost model prices every candidate, so a step costs
milliseconds. Accuracy mode adds one validation pass per unit per step.

    python benchmarks/greedy.py
"""

from __future__ import annotations

import time

import torch

import autoprune as ap
from autoprune.greedy import greedy_widths


def main() -> None:
    torch.manual_seed(0)
    model = ap.models.create("resnet56", num_classes=10).eval()
    space = ap.Space(model, torch.zeros(1, 3, 32, 32))
    scores = ap.criteria.score("l1", space)
    print(f"resnet56: {len(space.units)} units, criterion mode, step 0.5% of base FLOPs")
    for budget in ("flops<=70%", "flops<=50%", "flops<=30%"):
        start = time.perf_counter()
        result = greedy_widths(space, scores, budget, progress=False)
        elapsed = time.perf_counter() - start
        steps = len(result.trajectory)
        print(f"{budget:<12} {steps:>4} steps  {elapsed:6.2f} s  {1e3 * elapsed / steps:7.1f} ms/step")


if __name__ == "__main__":
    main()
