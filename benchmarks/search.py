"""Search runner: per-trial overhead and throughput with 1 vs 2 concurrent trials.

resnet20 on digits (8x8) with the shipped ``resnet_cifar`` search space (DI/HRank/L1 mix,
SG clusters; proxy: 20 adaptive-BN batches, 50 fine-tune steps, 4 eval batches), one CPU
per trial, on a local Ray that autoprune starts. The same number of trials runs with 1 and
with 2 workers. Every trial reports when it started, its wall time and the proxy compute
inside it (adaptive BN + fine-tune + evaluation).

* per-trial overhead: trials are laid out on their worker slots; a trial's wall time is
  from the end of the previous trial in its slot (its own start for the first one) to its
  end, so it includes Tune's scheduling gap, the object-store read of the shared state,
  fitting/selecting/pruning the structure and reporting. Overhead = 1 - compute / wall,
  summed over trials. Target: <= 10%.
* one-off start-up: Tune's ``fit`` until the first trial starts (actor processes start and
  import torch/autoprune) and after the last ends; the first trial in each fresh worker
  process also computes slower (first-call warm-up). Ray's own start and the driver's
  calibration/greedy seeding come before ``fit`` and are printed as ``total``.
* throughput: trials per minute of ``fit`` wall time (end to end) and of the span from the
  first trial's start to the last one's end (steady state); 2 vs 1 workers. Target: >= 1.7x.

    python benchmarks/search.py [--trials 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

import autoprune as ap  # noqa: E402
from autoprune.search.runner import search  # noqa: E402
from autoprune.train import train  # noqa: E402


def slot_walls(rows: list[dict]) -> list[float]:
    """Per trial: time since the previous trial on the same slot ended (or since its own start)."""
    ends: list[float] = []  # last end time per slot
    walls = []
    for r in sorted(rows, key=lambda r: r["started_at"]):
        start, end = r["started_at"], r["started_at"] + r["time_s"]
        free = [i for i, e in enumerate(ends) if e <= start + 1e-3]
        if free:
            i = max(free, key=lambda i: ends[i])  # the slot that freed up last before this start
            walls.append(end - ends[i])
            ends[i] = end
        else:
            walls.append(end - start)
            ends.append(end)
    return walls


def run(model, data, trials: int, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-search-") as out:
        start = time.perf_counter()
        result = search(model, data, "flops<=50%", space="resnet_cifar", trials=trials, workers=workers,
                        out=out, finetune_epochs=0, progress=False)
        total = time.perf_counter() - start
    rep, rows = result.report, result.report["trials"]
    fit, fit_start = rep["search"]["tune_s"], rep["search"]["tune_started_at"]
    first = min(r["started_at"] for r in rows)
    last = max(r["started_at"] + r["time_s"] for r in rows)
    walls = slot_walls(rows)
    compute = sum(r["compute_s"] for r in rows)
    return {"workers": workers, "trials": len(rows), "total_s": total, "fit_s": fit,
            "startup_s": first - fit_start, "teardown_s": fit_start + fit - last,
            "wall_s": sum(walls) / len(rows), "compute_s": compute / len(rows),
            "overhead": 1.0 - compute / sum(walls), "throughput": 60.0 * len(rows) / fit,
            "steady": 60.0 * len(rows) / (last - first), "driver_cpu_s": rep["search"]["driver_cpu_s"],
            "states": rep["search"]["states"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = ap.data.load("digits", image_size=8)
    model = ap.models.create("resnet20", num_classes=10)
    train(model, data, epochs=3, progress=False)
    print(f"resnet20 / digits 8x8, space resnet_cifar (proxy 20 BN batches, 50 steps, 4 eval batches), "
          f"flops<=50%, {args.trials} trials per run, 1 CPU per trial, {os.cpu_count()} CPUs")
    results = [run(model, data, args.trials, w) for w in (1, 2)]
    print(f"{'workers':>7} {'total s':>8} {'fit s':>6} {'start-up s':>10} {'trial s':>8} {'compute s':>9} "
          f"{'overhead':>8} {'trials/min':>10} {'steady/min':>10} {'driver CPU s':>12}")
    for r in results:
        print(f"{r['workers']:>7} {r['total_s']:>8.1f} {r['fit_s']:>6.1f} {r['startup_s']:>10.1f} "
              f"{r['wall_s']:>8.2f} {r['compute_s']:>9.2f} {r['overhead']:>8.1%} {r['throughput']:>10.2f} "
              f"{r['steady']:>10.2f} {r['driver_cpu_s']:>12.2f}")
    one, two = results
    print(f"per-trial overhead: {one['overhead']:.1%} (1 worker), {two['overhead']:.1%} (2 workers); "
          f"target <= 10%")
    print(f"throughput 2 vs 1 workers: {two['throughput'] / one['throughput']:.2f}x end to end, "
          f"{two['steady'] / one['steady']:.2f}x steady state; target >= 1.7x")


if __name__ == "__main__":
    main()
