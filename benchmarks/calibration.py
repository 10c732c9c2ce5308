"""Calibration cost per criterion on ResNet-56, as a ratio to plain forward passes.

For each criterion, one calibration pass over the same N CIFAR-sized images is timed
and divided by the time of plain forward passes over those images (no hooks, no
grad). Forward-only criteria target ≤ 3×; gradient criteria (taylor, wsp_data) also
run a backward pass. Data-free criteria (l1, l2, bn_scale, wsp, random) are omitted.
The SG-CNN grouped-conv latency comparison is `benchmarks/selfgroup.py`.

    python benchmarks/calibration.py [--images 256] [--batch 64]
"""

from __future__ import annotations

import argparse
import torch

import autoprune as ap
from autoprune import criteria
from autoprune.calibrate import calibrate
from timing import median_time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ap.models.create("resnet56", num_classes=10).eval()
    space = ap.Space(model, torch.zeros(1, 3, 32, 32))
    batches = [(torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
               for _ in range(args.images // args.batch)]

    def forward():
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    base = median_time(forward, 3)
    print(f"resnet56, {args.images} images 32x32, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"plain forward: {base * 1e3:.0f} ms")
    print(f"{'criterion':<12}{'grad':>6}{'ms':>10}{'ratio':>8}")
    for name in criteria.available():
        crit = criteria.get(name)
        if not crit.taps():
            continue
        spec = (name, {"num_classes": 10}) if name == "di" else name
        t = median_time(lambda: calibrate(space, model, batches, [spec], n_images=args.images,
                                          progress=False), 1)
        print(f"{name:<12}{'yes' if crit.needs_grad else 'no':>6}{t * 1e3:>10.0f}{t / base:>8.2f}")


if __name__ == "__main__":
    main()
