"""Does SG-CNN's diverse group convolution run faster than the dense conv it replaces?

A C→C 3×3 conv (padding 1; C = 64 by default) on a batch of 64 images of S×S (32 by
default), on the CPU, forward only under ``torch.no_grad()``. For several cluster counts ``k`` and connection-pruning
fractions ``cp`` the conv is self-grouped and this prints the median
forward time of the grouped conv as a ratio of the dense conv's next to the FLOPs ratio
(grouped / dense, exact: Σ_g |S_g|·|G_g|·9·H·W over C·C·9·H·W). Variants are timed
round-robin, one call each per round, so that load from other processes hits them alike.

A second table times one training step (forward and backward of ``sum(y²)``) of each
grouped conv two ways, side by side: the per-group computation (what eval mode runs) and the
training path (one dense conv on the masked weight assembled from the per-group weights,
what train mode runs; see :mod:`autoprune.selfgroup_layers`), as ratios of the dense conv's
step.

The weights are randomly initialised, so the k-means groups are arbitrary; only the
group sizes and input-set sizes matter for speed, and ``cp`` fixes the kept fraction.

    python benchmarks/selfgroup.py [--rounds 15] [--threads N] [--channels C] [--size S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from typing import Callable

import torch
from torch import nn

from autoprune.selfgroup import grouped_flops, self_group

KS = (4, 16)
CPS = (0.25, 0.5, 0.75, 0.9)


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (anything else: one line, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=positive, default=15, help="timed calls per variant (median)")
    ap.add_argument("--threads", type=positive, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--channels", type=positive, default=64, help="input and output channels C")
    ap.add_argument("--size", type=positive, default=32, help="image side S")
    args = ap.parse_args()
    c, size = args.channels, args.size
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    dense = nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
    x = torch.randn(64, c, size, size)
    variants = {"dense": dense}
    flops = {"dense": c * c * 9 * size * size}
    for k in KS:
        for cp in CPS:
            g = self_group(dense, k=k, cp=cp, seed=0).eval()
            name = f"k={k:<2d} cp={cp:.2f}"
            variants[name] = g
            flops[name] = grouped_flops(g.spec_entry(), (size, size), 3)
            with torch.no_grad():  # sanity: same output as the masked dense conv
                assert torch.allclose(g(x[:2]), g.to_dense()(x[:2]), atol=1e-4)
    with torch.no_grad():
        med = timed({n: (lambda m=m: m(x)) for n, m in variants.items()}, args.rounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"self-grouped {c}->{c} 3x3 conv, input {tuple(x.shape)}, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} (load avg {load:.1f})")
    print(f"dense conv: {med['dense'] * 1e3:.1f} ms, {flops['dense'] / 1e6:.1f} MFLOPs per image")
    print(f"{'variant':<14} {'groups':>6} {'FLOPs ratio':>11} {'latency ratio':>13} {'ms':>8}")
    for name in variants:
        if name == "dense":
            continue
        print(f"{name:<14} {variants[name].num_groups:>6d} {flops[name] / flops['dense']:>11.3f} "
              f"{med[name] / med['dense']:>13.3f} {med[name] * 1e3:>8.1f}")

    def step(m: nn.Module, train: bool) -> Callable[[], None]:
        def run() -> None:
            m.train(train)
            m.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
        return run

    steps = {"dense": step(dense, True)}
    for name, m in variants.items():
        if name != "dense":
            steps[f"{name} per-group"] = step(m, False)
            steps[f"{name} training"] = step(m, True)
    med = timed(steps, args.rounds)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\ntraining step (forward + backward), median of {args.rounds} (load avg {load:.1f}); "
          f"dense conv: {med['dense'] * 1e3:.1f} ms")
    print(f"{'variant':<14} {'per-group / dense':>17} {'training path / dense':>21} {'speed-up':>8}")
    for name in variants:
        if name == "dense":
            continue
        pg, tr = med[f"{name} per-group"], med[f"{name} training"]
        print(f"{name:<14} {pg / med['dense']:>17.3f} {tr / med['dense']:>21.3f} {pg / tr:>7.2f}x")


def timed(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each call, timed round-robin (one call each per round) after a warm-up."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


if __name__ == "__main__":
    main()
