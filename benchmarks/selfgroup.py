"""Does SG-CNN's diverse group convolution run faster than the dense conv it replaces?

A 64→64 3×3 conv (padding 1) on a batch of 64 images of 32×32, on the CPU, forward
only under ``torch.no_grad()``. For several cluster counts ``k`` and connection-pruning
fractions ``cp`` the conv is self-grouped and this prints the median
forward time of the grouped conv as a ratio of the dense conv's next to the FLOPs ratio
(grouped / dense, exact: Σ_g |S_g|·|G_g|·9·H·W over 64·64·9·H·W). Variants are timed
round-robin, one call each per round, so that load from other processes hits them alike.

The weights are randomly initialised, so the k-means groups are arbitrary; only the
group sizes and input-set sizes matter for speed, and ``cp`` fixes the kept fraction.

    python benchmarks/selfgroup.py [--rounds 15] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from torch import nn

from autoprune.selfgroup import grouped_flops, self_group

KS = (4, 16)
CPS = (0.25, 0.5, 0.75, 0.9)
SHAPE = (64, 64, 32, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15, help="timed calls per variant (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    dense = nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    x = torch.randn(*SHAPE)
    variants = {"dense": dense}
    flops = {"dense": 64 * 64 * 9 * 32 * 32}
    for k in KS:
        for cp in CPS:
            g = self_group(dense, k=k, cp=cp, seed=0).eval()
            name = f"k={k:<2d} cp={cp:.2f}"
            variants[name] = g
            flops[name] = grouped_flops(g.spec_entry(), (32, 32), 3)
            with torch.no_grad():  # sanity: same output as the masked dense conv
                assert torch.allclose(g(x[:2]), g.to_dense()(x[:2]), atol=1e-4)
    times: dict[str, list[float]] = {n: [] for n in variants}
    with torch.no_grad():
        for m in variants.values():  # warm-up
            m(x)
        for _ in range(args.rounds):
            for name, m in variants.items():
                start = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - start)
    med = {n: statistics.median(t) for n, t in times.items()}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"self-grouped 64->64 3x3 conv, input {tuple(SHAPE)}, CPU, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} (load avg {load:.1f})")
    print(f"dense conv: {med['dense'] * 1e3:.1f} ms, {flops['dense'] / 1e6:.1f} MFLOPs per image")
    print(f"{'variant':<14} {'groups':>6} {'FLOPs ratio':>11} {'latency ratio':>13} {'ms':>8}")
    for name in variants:
        if name == "dense":
            continue
        print(f"{name:<14} {variants[name].num_groups:>6d} {flops[name] / flops['dense']:>11.3f} "
              f"{med[name] / med['dense']:>13.3f} {med[name] * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
