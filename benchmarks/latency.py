"""Pruned vs base CPU latency at 50% FLOPs, next to the FLOPs ratio.

ResNet-56 (CIFAR, 32x32) and ResNet-50 (torchvision, 224x224), uniform structure at
flops<=50% (L1 selection), random weights (latency does not depend on them). Median
of timed forward passes after warm-up, batch 1 and 64, both models timed
alternately so load hits them alike.

    python benchmarks/latency.py [--runs 20]
"""

from __future__ import annotations

import argparse

import torch

import autoprune as ap
from autoprune.evaluate import latency

CASES = (("resnet56", (3, 32, 32)), ("resnet50", (3, 224, 224)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU, {torch.get_num_threads()} threads, median of {args.runs} runs")
    print(f"{'model':<10}{'batch':>6}{'base ms':>10}{'pruned ms':>11}{'latency':>9}{'FLOPs':>7}{'lat/FLOPs':>11}")
    for name, shape in CASES:
        model = ap.models.create(name, num_classes=10).eval()
        space = ap.Space(model, torch.zeros(1, *shape))
        widths = space.fit({u.name: 0.5 for u in space.units}, "flops<=50%")
        small = ap.select(space, widths).apply(model).eval()
        flops = space.cost(widths).flops / space.cost().flops
        for batch in (1, 64):
            runs = args.runs if batch == 1 or name == "resnet56" else max(3, args.runs // 4)
            base = latency(model, shape, batch_size=batch, runs=runs, warmup=2)["median_ms"]
            pruned = latency(small, shape, batch_size=batch, runs=runs, warmup=2)["median_ms"]
            ratio = pruned / base
            print(f"{name:<10}{batch:>6}{base:>10.1f}{pruned:>11.1f}{ratio:>9.3f}{flops:>7.3f}{ratio / flops:>11.2f}")


if __name__ == "__main__":
    main()
