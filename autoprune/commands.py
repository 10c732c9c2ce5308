"""The subcommands of the command line: ``info``, ``train``, ``prune``, ``search``, ``compare``
and ``fidelity``, each one function registered with :func:`autoprune.cli_args.command` (in this
order, which is the order ``--help`` lists them). Each checks every option before any long
work, then calls the Python API; :mod:`autoprune.cli` parses and dispatches.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

from .cli_args import (BASELINE, BASELINE_AND_BUDGET, BUDGETS, CHANNELS, CLASSES, DATA, FASTNAS, FINETUNE,
                       GREEDY, IMAGE_SIZE, LR, NONNEG_INT, POS_INT, SEED, WSP_VARIANT, Later, UsageError, arg,
                       budget_of, budgets_of, command, data_options, method_options as method_options_of,
                       parse_criterion, writable_dir, writable_file)
from .errors import AutopruneError, CheckpointError, ModelError
from .limits import MAX_CLASSES, MAX_IMAGE_SIZE


def _method_help() -> str:
    from . import methods
    listed = "; ".join(f"{name}{' (default)' if name == 'greedy' else ''}: {methods.get(name).help}"
                       for name in methods.available())
    return f"width method, one of {', '.join(methods.available())} ({listed})".replace("%", "%%")


def _methods_default() -> str:
    from . import methods
    return ",".join(methods.available())


# --------------------------------------------------------------------------- helpers


def _human(n: float, unit: str = "") -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{int(n)}{unit}"


def _probe(model: torch.nn.Module, shape: Sequence[int], name: str) -> torch.Tensor:
    """A zero input of ``shape``, checked to fit in memory and to pass through ``model``
    (one clear error if not)."""
    from .limits import check_forward

    check_forward(model, shape, name, batch_size=1)
    x = torch.zeros(1, *shape)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{name} cannot take input of shape {tuple(x.shape)}: {first}; "
                         "try a larger --input-size / --image-size") from None
    finally:
        model.train(was_training)
    return x


def _info_model(args: argparse.Namespace) -> tuple[torch.nn.Module, tuple[int, ...], str]:
    """The model, its per-sample input shape and a title, from --checkpoint or --model."""
    from . import models

    shape = (args.channels, args.input_size, args.input_size)
    if args.checkpoint is None:
        if args.model is None:
            raise UsageError("info needs --model NAME or --checkpoint FILE")
        model = models.create(args.model, num_classes=args.num_classes)
        return model, shape, f"{args.model} ({args.num_classes} classes)"
    model, meta = _load_checkpoint(args)
    arch = models.arch_of(model)
    shape = tuple(meta.get("input_shape") or shape)
    return model, shape, f"{arch['name']} ({arch['num_classes']} classes) from {args.checkpoint}"


def _load_checkpoint(args: argparse.Namespace) -> tuple[torch.nn.Module, dict]:
    """The baseline in --checkpoint, checked against --model when both are given."""
    from . import checkpoint, models

    model, meta = checkpoint.load_baseline(args.checkpoint)
    arch = models.arch_of(model)
    if args.model is not None and args.model.strip().lower() != arch["name"]:
        raise CheckpointError(f"checkpoint {args.checkpoint} holds {arch['name']}, not "
                              f"{args.model}; drop --model or pass --model {arch['name']}")
    return model, meta


def _unit_shares(space) -> list[tuple[float, float]]:
    """Per unit, the share of FLOPs and params that pruning it to ``min_width`` removes."""
    base = space.cost()
    shares = []
    for unit in space.units:
        cost = space.cost({unit.name: unit.min_width})
        shares.append(((base.flops - cost.flops) / base.flops, (base.params - cost.params) / base.params))
    return shares


def _prune_inputs(args: argparse.Namespace):
    """(model, data) from --checkpoint (its data by default) or --model/--data (cached baseline)."""
    from . import data, models
    from .baseline import cached_baseline, check_compatible
    from .pipeline import check_fits

    if args.checkpoint is None:
        if args.model is None or args.data is None:
            raise UsageError("give --checkpoint FILE, or --model NAME and --data NAME")
        bundle = data.load(args.data, image_size=args.image_size, seed=args.seed,
                           root=args.data_root, download=args.download, **data_options(args))
        check_fits(models.create(args.model, num_classes=bundle.num_classes), bundle)
        model, _ = cached_baseline(args.model, bundle, epochs=args.baseline_epochs, seed=args.seed,
                                   progress=not args.no_progress)
        return model, bundle
    model, meta = _load_checkpoint(args)
    saved = meta.get("data") or {}
    name = args.data or saved.get("name")
    if name is None:
        raise UsageError(f"{args.checkpoint} does not record its dataset; pass --data NAME")
    size = args.image_size or (saved.get("image_size") if name == saved.get("name") else None)
    bundle = data.load(name, image_size=size, seed=args.seed, root=args.data_root,
                       download=args.download,
                       **data_options(args, saved if name == saved.get("name") else None))
    check_compatible(model, bundle, f"checkpoint {args.checkpoint}")
    check_fits(model, bundle)
    return model, bundle


def _summary(report: dict) -> None:
    base, pruned = report["base"], report["pruned"]
    rows = [("FLOPs", _human(base["flops"]), _human(pruned["flops"]), pruned["flops"] / base["flops"]),
            ("params", _human(base["params"]), _human(pruned["params"]), pruned["params"] / base["params"]),
            ("accuracy", f"{base['accuracy']:.4f}", f"{pruned['accuracy']:.4f}", None),
            ("latency ms", f"{base['latency_ms']:.2f}", f"{pruned['latency_ms']:.2f}",
             pruned["latency_ms"] / base["latency_ms"])]
    b = report["budget"]
    crit = ", ".join(f"{k}:{v:g}" for k, v in report["criterion"].items())
    print(f"{report['method']} ({crit}) at {b['spec']}: realized "
          f"{b['realized_ratio']:.2%} of base {b['kind']} ({'within' if b['within_tolerance'] else 'outside'} 0.5% of target)")
    print(f"{'':<11}{'base':>10}{'pruned':>10}{'ratio':>8}")
    for label, x, y, r in rows:
        print(f"{label:<11}{x:>10}{y:>10}{'' if r is None else f'{r:.3f}':>8}")


# --------------------------------------------------------------------------- commands


@command(
    "info", "list a model's prunable units and what each costs",
    arg("--model", metavar="NAME", help="model name (see autoprune.models.available())"),
    arg("--checkpoint", metavar="FILE", help="a baseline written by 'autoprune train'"),
    arg("--input-size", type=IMAGE_SIZE, default=32, metavar="S",
        help=f"input is SxS, S <= {MAX_IMAGE_SIZE} (default 32)"),
    arg("--num-classes", type=CLASSES, default=10, metavar="K", help=f"at most {MAX_CLASSES} (default 10)"),
    arg("--channels", type=CHANNELS, default=3, metavar="C", help="input channels (default 3)"),
)
def info(args: argparse.Namespace) -> int:
    from .space import Space

    model, shape, title = _info_model(args)
    space = Space(model.eval(), _probe(model, shape, title))
    base = space.cost()
    print(f"{title}, input {'x'.join(map(str, (1, *shape)))}: {len(space.units)} prunable units")
    width = max(len("unit"), *(len(u.name) for u in space.units))
    print(f"{'unit':<{width}}  {'width':>5}  {'min':>5}  {'step':>4}  {'FLOPs':>7}  {'params':>7}")
    for unit, (flops, params) in zip(space.units, _unit_shares(space)):
        print(f"{unit.name:<{width}}  {unit.width:>5}  {unit.min_width:>5}  {unit.step:>4}  "
              f"{flops:>7.1%}  {params:>7.1%}")
    print(f"total FLOPs  {base.flops:,} ({_human(base.flops)} multiply-adds)")
    print(f"total params {base.params:,} ({base.params / 1e6:.3f}M)")
    return 0


@command(
    "train", "train a baseline model and save it as a checkpoint",
    arg("--model", required=True, metavar="NAME", help="model name, e.g. resnet20"),
    *DATA,
    arg("--epochs", type=POS_INT, default=30, help="default 30"),
    arg("--lr", type=LR, default=0.1, help="peak learning rate (default 0.1)"),
    arg("--batch-size", type=POS_INT, default=64, help="default 64"),
    SEED,
    arg("--out", default="base.pt", metavar="FILE", help="checkpoint to write (default base.pt)"),
    arg("--no-progress", action="store_true", help="no progress bars"),
)
def train(args: argparse.Namespace) -> int:
    from . import checkpoint, data, models
    from .limits import check_forward
    from .train import default_device, train as fit

    writable_file(args.out)
    bundle = data.load(args.data, image_size=args.image_size, seed=args.seed,
                       root=args.data_root, download=args.download, **data_options(args))
    torch.manual_seed(args.seed)
    model = models.create(args.model, num_classes=bundle.num_classes)
    _probe(model, bundle.input_shape, args.model)
    check_forward(model, bundle.input_shape, args.model, batch_size=args.batch_size, training=True,
                  device=default_device(), hint="use a smaller --image-size or --batch-size")
    history = fit(model, bundle, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                  seed=args.seed, progress=not args.no_progress)
    checkpoint.save_baseline(args.out, model.cpu(), accuracy=history["test_acc"],
                             data=bundle.settings | {"name": bundle.name},
                             input_shape=list(bundle.input_shape), epochs=args.epochs,
                             seed=args.seed, lr=args.lr, batch_size=args.batch_size,
                             history=history)
    print(f"{args.model} on {bundle.name}: test accuracy {history['test_acc']:.4f} "
          f"after {args.epochs} epoch(s); saved {args.out}")
    return 0


@command(
    "prune", "prune a model to a FLOPs or params budget and fine-tune it",
    *BASELINE_AND_BUDGET,
    arg("--method", default="greedy", help=Later(_method_help)),
    arg("--criterion", metavar="C", help="di (default), hpse, fchp, hrank, taylor, l1, ... or a mix di:0.6,hpse:0.4"),
    arg("--clusters", metavar="M", help="keep channels per cluster: hpse, fchp or sg"),
    arg("--cluster-k", type=POS_INT, metavar="K",
        help="clusters per unit for --clusters (default: the clustering's own)"),
    *GREEDY,
    WSP_VARIANT,
    arg("--sg-k", type=POS_INT, default=16, metavar="K",
        help="--method selfgroup's k-means filter groups per layer (default 16, capped at its filters)"),
    *FASTNAS,
    *FINETUNE,
    arg("--out", required=True, metavar="DIR", help="receives model.pt, plan.json, report.json, widths.png"),
    arg("--no-progress", action="store_true", help="no progress bars"),
)
def prune(args: argparse.Namespace) -> int:
    from .pipeline import check_options
    from .prune import prune as run

    budget = budget_of(args)  # every option checked before a baseline is trained or loaded
    method_options = method_options_of(args, [args.method])
    criterion = check_options(args.method, parse_criterion(args.criterion), args.clusters,
                              calib_images=args.calib_images, cluster_k=args.cluster_k,
                              wsp_variant=args.wsp_variant, sg_k=args.sg_k, **method_options)
    out = writable_dir(args.out)
    model, bundle = _prune_inputs(args)
    result = run(model, bundle, budget, method=args.method, criterion=criterion,
                 clusters=args.clusters, cluster_k=args.cluster_k, finetune_epochs=args.epochs, lr=args.lr,
                 distill=args.distill, seed=args.seed, calib_images=args.calib_images,
                 wsp_variant=args.wsp_variant, sg_k=args.sg_k, out=out, **method_options,
                 progress=not args.no_progress)
    _summary(result.report)
    print(f"saved {out / 'model.pt'} (load with autoprune.load), plan.json, report.json, widths.png")
    return 0


SEARCH_INPUTS = ("checkpoint", "model", "data", "image_size", "train_size", "data_root", "download",
                 "baseline_epochs", "seed", "epochs", "lr", "distill", "calib_images", "flops", "params")


@command(
    "search", "search pruned structures (Optuna on Ray Tune) and fine-tune the best",
    *BASELINE_AND_BUDGET,
    arg("--space", default="resnet_cifar", metavar="NAME|FILE",
        help="packaged search space (resnet_cifar, vgg_cifar, generic) or a YAML file (default resnet_cifar)"),
    arg("--trials", type=POS_INT, default=64, help="structures to evaluate, the 2 seeds included (default 64)"),
    arg("--workers", type=POS_INT, default=2, help="trials running at once (default 2)"),
    arg("--address", metavar="auto|HOST:PORT",
        help="join a running Ray cluster (default: start a local Ray and stop it at the end)"),
    *FINETUNE,
    arg("--out", metavar="DIR", help="receives the Ray Tune experiment (tune/), model.pt, plan.json, "
                                     "report.json and plots"),
    arg("--resume", metavar="DIR", help="continue the interrupted search in DIR with its recorded "
                                        "settings (only --address and --no-progress apply)"),
    arg("--no-progress", action="store_true", help="no progress bars or Tune status tables"),
)
def search(args: argparse.Namespace) -> int:
    from .search import load as load_space
    from .search.runner import SPACE_FILE, read_settings, search as run

    if args.resume is not None:
        if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UsageError(f"--resume {args.resume} continues the search in that folder; drop --out "
                             f"{args.out} (or give the same folder)")
        if not Path(args.resume).is_dir():
            raise AutopruneError(f"--resume {args.resume}: no such folder; give the --out of an earlier search")
        out = writable_dir(args.resume)
        settings = read_settings(out)  # one line naming the key if search.json is damaged
        load_space(out / SPACE_FILE)  # the recorded space, checked before any model or data is loaded
        recorded = settings.get("inputs") or {}  # empty if started from Python: give --checkpoint etc.
        for key in SEARCH_INPUTS:
            if key in recorded:
                setattr(args, key, recorded[key])
        args.seed, budget = settings["seed"], settings["budget"]
    else:
        if args.out is None:
            raise UsageError("give --out DIR for a new search, or --resume DIR to continue one")
        budget = budget_of(args)  # budget and search space checked before a baseline is trained
        load_space(args.space)
        out = writable_dir(args.out)
        for key in ("checkpoint", "data_root"):  # recorded for --resume, which may run elsewhere
            if getattr(args, key) is not None:
                setattr(args, key, str(Path(getattr(args, key)).resolve()))
    model, bundle = _prune_inputs(args)
    inputs = {key: getattr(args, key) for key in SEARCH_INPUTS}
    result = run(model, bundle, budget, space=args.space, trials=args.trials,
                 workers=args.workers, address=args.address, out=out, resume=args.resume is not None,
                 finetune_epochs=args.epochs, lr=args.lr, distill=args.distill, seed=args.seed,
                 calib_images=args.calib_images, progress=not args.no_progress, inputs=inputs)
    report = result.report
    _summary(report)
    best, seeds = report["best_trial"], report["seeds"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in report["search"]["states"].items())
    print(f"{len(report['trials'])} trials ({states}) on {len(report['search']['nodes'])} node(s); "
          f"best trial {best['number']}: proxy {best['proxy_score']:.4f}; seeds: "
          + ", ".join(f"{name} {s['proxy_score']:.4f}" if s and s["proxy_score"] is not None else f"{name} -"
                      for name, s in seeds.items()))
    plots = [p for p in ("history.png", "pareto.png", "importances.png") if (out / p).exists()]
    print(f"saved {out / 'model.pt'} (load with autoprune.load), plan.json, report.json, widths.png, "
          f"{', '.join(plots)}; continue an interrupted run with: autoprune search --resume {out}")
    return 0


@command(
    "compare", "compare width methods side by side at several budgets",
    *BASELINE,
    *BUDGETS,
    arg("--methods", default=Later(_methods_default),
        help=Later(lambda: f"comma list (default {_methods_default()})")),
    arg("--criterion", metavar="C", help="criterion or mix for greedy/uniform (default di)"),
    *GREEDY,
    *FASTNAS,
    arg("--seeds", type=NONNEG_INT, nargs="+", default=[0, 1, 2, 3, 4],
        help="seeds per budget and method, paired across methods (default 0 1 2 3 4)"),
    arg("--epochs", type=NONNEG_INT, default=5, help="fine-tuning epochs for every method (default 5)"),
    arg("--space", default="generic",
        help="search space for method search, its arms (random, search_widths) and --fidelity (default generic)"),
    arg("--trials", type=POS_INT, default=16, help="trials of search and of each of its arms (default 16)"),
    arg("--workers", type=POS_INT, default=2, help="concurrent search trials (default 2)"),
    arg("--fidelity", type=NONNEG_INT, default=0, metavar="N",
        help="also measure proxy fidelity on N random structures per budget (at least 3; 0: skip): "
             "fidelity.json, fidelity.md"),
    arg("--baseline-epochs", type=POS_INT, default=30, help="epochs when training the baseline (default 30)"),
    arg("--seed", type=NONNEG_INT, default=0, help="data split and baseline seed (default 0)"),
    arg("--out", required=True, metavar="DIR", help="receives results.csv/json/md, plots, runs/"),
    arg("--no-progress", action="store_true", help="no progress bars"),
)
def compare(args: argparse.Namespace) -> int:
    from .compare import check_options, compare as run, markdown
    from .prune import search_run

    budgets = budgets_of(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    criterion = parse_criterion(args.criterion)
    method_options = method_options_of(args, methods)
    # the space too if a search runs
    check_options(methods, criterion, space=args.space, what="--methods", **method_options)
    searches = any(search_run(m) is not None for m in methods)
    if args.fidelity:
        _check_fidelity(args, budgets, n=args.fidelity, what="--fidelity", pick=args.trials)
    out = writable_dir(args.out)
    model, bundle = _prune_inputs(args)
    extra = {"space": args.space, "trials": args.trials, "workers": args.workers} if searches else {}
    results = run(model, bundle, budgets, methods, args.seeds, finetune_epochs=args.epochs,
                  criterion=criterion, out=out, progress=not args.no_progress, **extra, **method_options)
    print(markdown(results["summary"], results["tests"], results["settings"]["reference"], results["skipped"],
                   results["unreached"]), end="")
    if args.fidelity:
        _fidelity(args, model, bundle, budgets, out, n=args.fidelity, pick=args.trials)
    print(f"wrote {out}/results.csv, results.json, results.md, accuracy_vs_flops.png, widths_*.png")
    return 0


def _check_fidelity(args: argparse.Namespace, budgets: list, n: int, what: str, **kw) -> None:
    """Every proxy-fidelity option checked before any work (``what``: the option giving ``n``;
    ``kw``: ``bn_batches`` and ``pick``, both positive already by their argument types)."""
    from .errors import OptionError
    from .fidelity import check_options

    try:
        check_options(n, budgets, args.space, args.epochs, args.seed, **kw)
    except OptionError as exc:
        raise OptionError(f"{what}: {exc}") from None


def _fidelity(args: argparse.Namespace, model, bundle, budgets: list, out: Path, n: int, **kw) -> None:
    """Proxy fidelity at every budget, written as fidelity.json and fidelity.md into ``out``; ``kw``
    (``bn_batches``, ``pick``) go to :func:`autoprune.fidelity.proxy_fidelity` (default: the runs' own)."""
    from .fidelity import markdown, proxy_fidelity, write_fidelity

    result = proxy_fidelity(model, bundle, budgets=budgets, n=n, space=args.space, finetune_epochs=args.epochs,
                            seed=args.seed, progress=not args.no_progress, out=out, **kw)
    write_fidelity(out, result)
    print(f"proxy fidelity over {n} structures per budget (Kendall tau with the accuracy after the "
          f"full fine-tune, {100 * result['confidence']:g}% bootstrap interval):")
    print(markdown(result), end="")
    print(f"wrote {out}/fidelity.json, fidelity.md")


@command(
    "fidelity", "measure how well the search's proxy ranks structures (Kendall tau with the full fine-tune)",
    *BASELINE,
    *BUDGETS,
    arg("--n", type=POS_INT, default=24, help="random structures per budget, at least 3 (default 24)"),
    arg("--space", default="generic", metavar="NAME|FILE",
        help="search space whose structures and proxy are measured (default generic)"),
    arg("--epochs", type=NONNEG_INT, default=5, help="full fine-tuning epochs per structure (default 5)"),
    arg("--bn-batches", type=NONNEG_INT, default=50,
        help="adaptive-BN batches for the proxy and before the full fine-tune, as the runs (default 50)"),
    arg("--baseline-epochs", type=POS_INT, default=30, help="epochs when training the baseline (default 30)"),
    SEED,
    arg("--out", required=True, metavar="DIR",
        help="receives fidelity.json and fidelity.md; while the study runs, fidelity-progress.json keeps "
             "each finished structure, so running the same command again resumes it"),
    arg("--pick", type=POS_INT, default=16, metavar="K",  # fidelity.DEFAULT_PICK (a test checks)
        help="also report the expected final accuracy of the proxy-best of K of the structures, as a "
             "search of K trials picks (capped at --n; default 16, compare's --trials)"),
    arg("--no-progress", action="store_true", help="no progress bars"),
)
def fidelity(args: argparse.Namespace) -> int:
    budgets = budgets_of(args)
    _check_fidelity(args, budgets, n=args.n, what="--n", bn_batches=args.bn_batches, pick=args.pick)
    out = writable_dir(args.out)
    model, bundle = _prune_inputs(args)
    _fidelity(args, model, bundle, budgets, out, n=args.n, bn_batches=args.bn_batches, pick=args.pick)
    return 0

