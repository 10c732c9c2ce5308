"""Search on a busy machine: Ray's worker niceness (+15, Ray's default) vs the driver's (0, ours).

A local Ray started by autoprune runs its trials in Ray worker processes. Ray renices those by
+15 unless ``RAY_worker_niceness`` says otherwise, so beside any busy process the trials -- the
search's whole work -- get a small share of the CPU. autoprune sets it to 0 for the Ray it
starts (``autoprune.search.ray_tune.ray_session``; a value the user set is kept).

Side by side in one run: the same small search (resnet20 on 8x8 digits, 1 epoch of training,
a space with an L1 widths-only search and a 5-step proxy, 2 workers of 1 thread) with one
busy process per core (a pure-Python loop at the driver's niceness) started before each
search and stopped after it, once with ``RAY_worker_niceness=15`` and once with ``0``. Printed:
each search's wall time and the ratio (that the trials really run at the niceness asked for is
tests/test_search.py's check). Whatever else runs on the machine adds to the load; say so with
the numbers.

    python benchmarks/ray_niceness.py [--trials 6]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402

import autoprune as ap  # noqa: E402
from autoprune.search.ray_tune import WORKER_NICENESS  # noqa: E402
from autoprune.search.runner import search  # noqa: E402
from autoprune.train import train  # noqa: E402

SPACE = """\
ratios:
  - match: '.*'
    low: 0.0
    high: 0.8
    tie: stage
criteria: [l1]
proxy: {bn_batches: 2, finetune_steps: 5, eval_batches: 1, lr: 0.01}
sampler: {name: tpe, n_startup_trials: 4}
"""


def _busy(stop) -> None:
    """A pure-Python loop until ``stop`` is set (one core's worth of load)."""
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


def timed_search(model, data, space: str, trials: int, niceness: str) -> float:
    """Wall seconds of one search at ``niceness`` with one busy process per core beside it."""
    os.environ[WORKER_NICENESS] = niceness
    stop = multiprocessing.Event()
    load = [multiprocessing.Process(target=_busy, args=(stop,), daemon=True) for _ in range(os.cpu_count() or 1)]
    for p in load:
        p.start()
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            result = search(model, data, "flops<=50%", space=space, trials=trials, workers=2,
                            finetune_epochs=0, out=os.path.join(out, "run"), progress=False)
            wall = time.perf_counter() - start
    finally:
        stop.set()
        for p in load:
            p.join()
    assert result.report["search"]["worker_niceness"] == niceness
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = ap.data.load("digits", image_size=8)
    model = ap.models.create("resnet20", num_classes=10)
    train(model, data, epochs=1, progress=False)
    model.eval()
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(SPACE)
    try:
        walls = {n: timed_search(model, data, f.name, args.trials, n) for n in ("15", "0")}
    finally:
        os.unlink(f.name)
    print(f"{args.trials} trials, 2 workers, {os.cpu_count()} busy processes beside the search, "
          f"load average before the end {os.getloadavg()[0]:.1f}")
    for n, wall in walls.items():
        print(f"  RAY_worker_niceness={n:>2}: {wall:7.1f} s")
    print(f"  niceness 15 / 0: {walls['15'] / walls['0']:.2f}x the wall time")


if __name__ == "__main__":
    main()
