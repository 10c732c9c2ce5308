"""Wall time of the DI greedy as the authors run it, on ResNet-56 (one CPU thread by default).

Runs the registered ``greedy`` method exactly as :func:`autoprune.prune` does (calibration
once, then the method with its defaults unless overridden) in three settings and prints
what each step costs and what a full walk costs (untrained weights unless ``--checkpoint``):

1. ``criterion`` mode, DI lost per FLOP, re-scored on the pruned network every step
   (one calibration pass per step) — to ``--budget-cheap`` (default flops<=70%);
2. ``accuracy`` mode (the default), re-scored every step, to ``--budget-accuracy`` (default
   flops<=95%), twice side by side: unscreened (``greedy_screen=0``, the authors': every
   candidate on all validation batches) and with the default screen (every candidate on one
   batch, the best 4 on all); prints the time per step of each, their ratio, the projected
   walk to 70/50/30% FLOPs, how many first steps commit the same unit and the masked
   accuracy after the last step (only meaningful with ``--checkpoint``, a trained net);
3. the old cheap mode: criterion mode without re-scoring (milliseconds per step);
4. ``accuracy`` mode with the default screen (``--prefix-screen``: another), to ``--budget-accuracy``, without and with
   prefix reuse (:mod:`autoprune.greedy_prefix`; ``methods.greedy.REUSE_PREFIX``), side by
   side: time per step, the ratio, and whether the two walks are identical (they must be:
   the reuse is exact).

``--parts 2`` runs only the second. Times come from the method's own
``info["greedy"]["wall_s"]``; evaluations from ``info["compute"]``. Use Fashion-MNIST
(``--data fashion-mnist --image-size 16``: 2,048 validation images per full evaluation);
digits has one validation batch, so screening saves nothing there.

    OMP_NUM_THREADS=1 python benchmarks/greedy.py --data fashion-mnist --image-size 16 --parts 2 \
        --budget-accuracy "flops<=98%"

Measured so (1 thread, the other core busy with the Fashion-MNIST comparison; README
"Benchmarks"): ResNet-56 (30 candidates per step) 231 s/step unscreened vs 75 s screened,
0.32x; trained ResNet-20 (12 per step, to 90%) 34.0 vs 17.4 s, 0.51x, and the two walks
commit different units from the first step (masked accuracy at the end 92.29% vs 91.94%).
"""

from __future__ import annotations

import argparse
import time

import torch

import autoprune as ap
from autoprune import methods, pipeline
from autoprune.calibrate import calibrate
from autoprune.checkpoint import load_baseline


def run(space, model, data, stats, scores, batches, budget: str, **options) -> dict:
    budget = ap.Budget.parse(budget)
    context = methods.Context(model, data, space, budget, scores, stats, seed=0, progress=False,
                              options=options, criterion={"di": 1.0}, calibration=batches)
    result = methods.get("greedy").widths(space, budget, context)
    info = result.info["greedy"]
    return {"steps": info["steps"], "wall_s": info["wall_s"], "rescores": info["rescores"],
            "evaluations": result.info["compute"]["proxy_evaluations"], "mode": info["mode"],
            "units": [t["unit"] for t in result.trajectory], "widths": result.widths,
            "proxies": [t["proxy"] for t in result.trajectory], "prefix": info["prefix_reuse"],
            "accuracy": result.trajectory[-1].get("accuracy", float("nan")) if result.trajectory else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-cheap", default="flops<=70%")
    parser.add_argument("--budget-accuracy", default="flops<=95%")
    parser.add_argument("--parts", default="1,2,3,4", help="which of the four settings to run, e.g. 2,4")
    parser.add_argument("--prefix-screen", type=int, default=None,
                        help="setting 4's greedy_screen (default: the method's; 0: the authors' unscreened walk)")
    parser.add_argument("--checkpoint", help="trained baseline (autoprune train) instead of untrained weights: "
                        "the screened and unscreened walks' agreement only means something on a trained net")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = ap.data.load(args.data, image_size=args.image_size)
    if args.checkpoint:
        model = load_baseline(args.checkpoint)[0].eval()
        args.model = args.checkpoint
    else:
        model = ap.models.create(args.model, num_classes=data.num_classes).eval()
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    batches = pipeline.calibration_batches(data, 0, args.calib_images)
    start = time.perf_counter()
    stats = calibrate(space, model, batches, [("di", {"num_classes": data.num_classes})],
                      n_images=args.calib_images, progress=False)
    calib_s = time.perf_counter() - start
    scores = ap.criteria.score("di", space, stats, num_classes=data.num_classes)
    defaults = methods.greedy.DEFAULTS
    print(f"{args.model} on {args.data} {tuple(data.input_shape)}: {len(space.units)} units, "
          f"{space.cost().flops / 1e6:.2f}M FLOPs, {args.threads} thread(s); val images per candidate "
          f"{min(len(data.val), 256 * methods.greedy.VAL_BATCHES)}, defaults {defaults}")
    print(f"calibration ({args.calib_images} images, one pass): {calib_s:.2f} s")

    parts = {int(p) for p in args.parts.split(",")}
    if 1 in parts:
        cheap = run(space, model, data, stats, scores, batches, args.budget_cheap, greedy_mode="criterion")
        per_rescore = cheap["wall_s"] / max(cheap["steps"], 1)
        print(f"1. criterion, re-scored every step, {args.budget_cheap}: {cheap['steps']} steps, "
              f"{cheap['wall_s']:.1f} s ({per_rescore:.2f} s/step: a calibration pass + the step's accuracy)")
    if 2 in parts:
        screening(args, space, model, data, stats, scores, batches)
    if 3 in parts:
        old = run(space, model, data, stats, scores, batches, "flops<=50%", greedy_mode="criterion",
                  greedy_rescore=0, greedy_bn_batches=0)
        print(f"3. criterion without re-scoring, flops<=50%: {old['steps']} steps, {old['wall_s']:.1f} s "
              f"(with each step's accuracy recorded)")
    if 4 in parts:
        prefix(args, space, model, data, stats, scores, batches)


def prefix(args, space, model, data, stats, scores, batches) -> None:
    """Setting 4: the default (screened) accuracy mode without and with prefix reuse."""
    walks = {}
    for reuse in (False, True):
        methods.greedy.REUSE_PREFIX = reuse
        try:
            screen = {} if args.prefix_screen is None else {"greedy_screen": args.prefix_screen}
            walks[reuse] = acc = run(space, model, data, stats, scores, batches, args.budget_accuracy, **screen)
        finally:
            methods.greedy.REUSE_PREFIX = True
        screened = "default screen" if args.prefix_screen is None else f"greedy_screen={args.prefix_screen}"
        print(f"4. accuracy ({screened}), prefix reuse {'on' if reuse else 'off'}, {args.budget_accuracy}: "
              f"{acc['steps']} steps, {acc['evaluations']} masked evaluations, {acc['wall_s']:.1f} s "
              f"({acc['wall_s'] / max(acc['steps'], 1):.2f} s/step); {acc['prefix']}")
    off, on = (walks[r]["wall_s"] / max(walks[r]["steps"], 1) for r in (False, True))
    same = all(walks[False][k] == walks[True][k] for k in ("units", "widths", "proxies"))
    print(f"   with/without prefix reuse, time per step: {on:.2f} / {off:.2f} s = {on / off:.2f}x; "
          f"walks {'identical (units, widths, accuracies)' if same else 'DIFFER'}")


def screening(args, space, model, data, stats, scores, batches) -> None:
    """Setting 2: the accuracy mode unscreened (the authors') and screened (the default), side by side."""
    defaults = methods.greedy.DEFAULTS
    step = defaults["greedy_step"]
    walks = {}
    for screen in (0, defaults["greedy_screen"]):  # the authors' (every candidate on all batches), the default
        acc = run(space, model, data, stats, scores, batches, args.budget_accuracy, greedy_screen=screen)
        walks[screen] = acc
        per_step = acc["wall_s"] / max(acc["steps"], 1)  # re-scoring included
        print(f"2. accuracy, greedy_screen={screen}, {args.budget_accuracy}: {acc['steps']} steps, "
              f"{acc['evaluations']} masked evaluations, {acc['wall_s']:.1f} s ({per_step:.2f} s/step, "
              f"re-scoring included); masked accuracy after the last step {acc['accuracy']:.4f}")
        for kept in (0.7, 0.5, 0.3):
            steps = round((1 - kept) / step)
            print(f"   projected flops<={kept:.0%} at step {step}: ~{steps} steps, ~{steps * per_step / 60:.1f} min")
    authors, screened = walks[0], walks[defaults["greedy_screen"]]
    same = next((i for i, (a, b) in enumerate(zip(authors["units"], screened["units"])) if a != b),
                min(len(authors["units"]), len(screened["units"])))
    print(f"   screened/unscreened time per step: {screened['wall_s'] / max(screened['steps'], 1):.2f} / "
          f"{authors['wall_s'] / max(authors['steps'], 1):.2f} s = "
          f"{(screened['wall_s'] / max(screened['steps'], 1)) / (authors['wall_s'] / max(authors['steps'], 1)):.2f}x; "
          f"the walks commit the same unit for the first {same} of {len(authors['units'])} steps; final widths "
          f"{'equal' if authors['widths'] == screened['widths'] else 'differ'}")


if __name__ == "__main__":
    main()
