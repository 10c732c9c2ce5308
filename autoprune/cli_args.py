"""How subcommands declare and check their options, at the edge, before any work.

A subcommand is one function registered with :func:`command`, which names its arguments
(:func:`arg`; :class:`Later` for a help text built from a registry when the parser is built).
Here too: argparse number types capped by :mod:`autoprune.limits`, the argument groups
several commands share, and the parsers that turn an option's string into a checked value
(a budget, a criterion mix, a writable ``--out``) before a baseline is trained or loaded.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import AutopruneError, OptionError, short
from .idx import ENV_VAR as IDX_ENV_VAR, SYSTEM_DIR as IDX_SYSTEM_DIR
from .limits import MAX_CHANNELS, MAX_CLASSES, MAX_IMAGE_SIZE
from .train import MAX_LR

if TYPE_CHECKING:
    from .budget import Budget


class UsageError(AutopruneError):
    """Bad command-line syntax (raised instead of argparse's print-usage-and-exit)."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, help line, :func:`arg` records and ``run(args) -> exit status``."""

    name: str
    help: str
    arguments: tuple
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def arg(*flags: str, **kwargs) -> tuple:
    """One ``add_argument`` call, recorded for :func:`command`."""
    return flags, kwargs


class Later:
    """An ``arg`` keyword value computed when the parser is built (e.g. a help text listing a
    registry), so importing this module imports no registry."""

    def __init__(self, make: Callable[[], object]) -> None:
        self.make = make


def command(name: str, help: str, *arguments: tuple):
    """Register the decorated ``fn(args) -> exit status`` as subcommand ``name``."""
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, help, arguments, fn)
        return fn
    return register


# --------------------------------------------------------------------------- argument types and groups


def _number(kind: type, positive: bool = True, maximum: float | None = None,
            why: str = "") -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` above zero (``positive``) or at least zero, and at
    most ``maximum`` (``why`` says why, in the error)."""
    what = ("positive" if positive else "non-negative") + f" {kind.__name__}"
    if maximum is not None:
        what += f" at most {maximum:g}" + (f" ({why})" if why else "")

    def parse(text: str):
        try:
            value = kind(text) if len(text) <= 100 else None
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (positive and value == 0) \
                or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected a {what}, got {short(text)}")
        return value
    return parse


POS_INT, POS_FLOAT, NONNEG_INT = _number(int), _number(float), _number(int, positive=False)
IMAGE_SIZE = _number(int, maximum=MAX_IMAGE_SIZE, why="larger images cannot fit in memory")
CLASSES = _number(int, maximum=MAX_CLASSES)
CHANNELS = _number(int, maximum=MAX_CHANNELS)
LR = _number(float, maximum=MAX_LR, why="larger rates only diverge")

SEED = arg("--seed", type=NONNEG_INT, default=0, help="fixes data splits, shuffling and init (default 0)")


def _wsp_variants() -> tuple[str, ...]:
    from .criteria.wsp import VARIANTS
    return VARIANTS


WSP_VARIANT = arg("--wsp-variant", default="weight", choices=Later(_wsp_variants),
                  help="--method wsp's saliencies: weight (filter and next-layer weight norms, the "
                       "authors' code; default) or data (mean |activation| and |gradient| over the "
                       "calibration images)")
"""Method wsp's saliency variant (:data:`autoprune.criteria.wsp.VARIANTS`)."""


def _default_help(method: str, text: str, key: str) -> Later:
    """``text`` and the default of option ``key`` from ``autoprune.methods.<method>.DEFAULTS``,
    read when the help is shown (the method's module is not imported at start-up)."""
    def make() -> str:
        from importlib import import_module
        defaults = import_module(f".methods.{method}", __package__).DEFAULTS
        return f"{text} (default {defaults[key]})"
    return Later(make)


def _greedy_help(text: str, key: str) -> Later:
    return _default_help("greedy", text, key)


GREEDY = (
    arg("--greedy-mode", metavar="MODE", help=_greedy_help(
        "--method greedy: accuracy (commit the step whose masked network scores best on validation, "
        "as the DI authors) or criterion (cheap: least DI lost per FLOP saved)", "greedy_mode")),
    arg("--greedy-step", type=POS_FLOAT, metavar="F",
        help=_greedy_help("FLOPs or params removed per greedy step, a fraction of the base (the authors: "
                          "0.005)", "greedy_step")),
    arg("--greedy-bn-batches", type=NONNEG_INT, metavar="N",
        help=_greedy_help("adaptive-BN batches before scoring each greedy step's accuracy (0: none)",
                          "greedy_bn_batches")),
    arg("--greedy-rescore", type=NONNEG_INT, metavar="N",
        help=_greedy_help("re-rank the kept channels by the criterion on the pruned network every N "
                          "greedy steps (1: every step, the authors'; 0: never)", "greedy_rescore")),
    arg("--greedy-cap", type=POS_FLOAT, metavar="F",
        help=_greedy_help("a unit at least this fraction pruned proposes no more greedy steps (1: no "
                          "cap)", "greedy_cap")),
    arg("--greedy-finetune-every", type=NONNEG_INT, metavar="K",
        help=_greedy_help("fine-tune the greedy's working copy every K steps (0: never)",
                          "greedy_finetune_every")),
    arg("--greedy-finetune-steps", type=POS_INT, metavar="S",
        help=_greedy_help("SGD steps of each greedy fine-tune", "greedy_finetune_steps")),
    arg("--greedy-recalibrate", type=NONNEG_INT, metavar="N",
        help=_greedy_help("re-estimate BN under the committed structure every N greedy steps (0: never)",
                          "greedy_recalibrate")),
    arg("--greedy-screen", type=NONNEG_INT, metavar="K",
        help=_greedy_help("accuracy mode: score every candidate step on one validation batch and only "
                          "the best K on all of them (0: every candidate on all, the authors')",
                          "greedy_screen")),
)
"""Method greedy's options (:data:`autoprune.methods.greedy.DEFAULTS`); unset ones keep prune's defaults."""


def _fastnas_help(text: str, key: str) -> Later:
    return _default_help("fastnas", text, key)


FASTNAS = (
    arg("--fastnas-batches", type=POS_INT, metavar="N",
        help=_fastnas_help("--method fastnas: training batches ModelOpt re-estimates each candidate's BN "
                           "statistics on (at least 50: it keeps its last 50)", "fastnas_batches")),
    arg("--fastnas-divisor", type=POS_INT, metavar="C",
        help=_fastnas_help("--method fastnas: width choices in multiples of C channels (ModelOpt's own 32 "
                           "is too coarse for 16- to 64-channel nets)", "fastnas_divisor")),
)
"""Method fastnas's options (:data:`autoprune.methods.fastnas.DEFAULTS`); unset ones keep prune's defaults."""


def _given(args: argparse.Namespace, names: tuple[str, ...]) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def greedy_options(args: argparse.Namespace) -> dict:
    """The greedy options given on the command line, as :func:`autoprune.prune` keywords."""
    return _given(args, ("greedy_mode", "greedy_step", "greedy_bn_batches", "greedy_rescore", "greedy_cap",
                         "greedy_finetune_every", "greedy_finetune_steps", "greedy_recalibrate", "greedy_screen"))


def fastnas_options(args: argparse.Namespace) -> dict:
    """The fastnas options given on the command line, as :func:`autoprune.prune` keywords."""
    return _given(args, ("fastnas_batches", "fastnas_divisor"))


OPTION_OWNERS = {"greedy": greedy_options, "fastnas": fastnas_options}
"""The method each group of method options belongs to, and the group's reader."""


def method_options(args: argparse.Namespace, methods: "list[str]") -> dict:
    """Every method option given on the command line (greedy's and fastnas's), as
    :func:`autoprune.prune` keywords; OptionError for one whose method is not among ``methods``
    (it would do nothing, and a user who gave it expects it to). With a method name that is
    not registered, the method check that follows reports that instead."""
    from .methods import available

    known = set(available())
    given = {}
    for owner, read in OPTION_OWNERS.items():
        options = read(args)
        if options and owner not in methods and known.issuperset(methods):
            flag = "--" + next(iter(options)).replace("_", "-")
            raise OptionError(f"{flag} is an option of method {owner}, which this command does not run "
                              f"(methods: {', '.join(methods) or 'none'})")
        given |= options
    return given


def _data_help(required: bool) -> Callable[[], str]:
    def make() -> str:
        from .data import DATASET_NAMES
        names = ", ".join(DATASET_NAMES[:-1]) + f" or {DATASET_NAMES[-1]}"
        return names + ("" if required else " (default: the checkpoint's)")
    return make


def data_args(required: bool) -> tuple:
    """--data and its options; optional where a checkpoint can name its own data."""
    return (
        arg("--data", required=required, metavar="NAME", help=Later(_data_help(required))),
        arg("--image-size", type=IMAGE_SIZE, metavar="N",
            help=f"resize images to NxN, N <= {MAX_IMAGE_SIZE} (dataset default)"),
        arg("--train-size", type=POS_INT, metavar="N",
            help="train on a stratified subset of N training images (datasets whose loader takes "
                 "train_size: fashion-mnist; the others refuse it)"
                 + ("" if required else "; default: the checkpoint's, else all")),
        arg("--data-root", metavar="DIR",
            help="folder holding the cifar10/cifar100 or fashion-mnist files (fashion-mnist is also "
                 f"looked for in ${IDX_ENV_VAR} and {IDX_SYSTEM_DIR})"),
        arg("--download", action="store_true",
            help="download cifar10/cifar100 or fashion-mnist into --data-root"),
    )


def data_options(args: argparse.Namespace, saved: dict | None = None) -> dict:
    """The dataset options the data arguments ask for beyond name, size, seed, root and download:
    ``train_size`` when --train-size is given (or, for the checkpoint's own dataset, recorded in
    its ``saved`` data settings). Only given options are passed, so a dataset whose loader does
    not take one refuses it with one line (:func:`autoprune.data.load`)."""
    size = args.train_size if args.train_size is not None else (saved or {}).get("train_size")
    return {} if size is None else {"train_size": size}


DATA = data_args(required=True)

BASELINE = (
    arg("--checkpoint", metavar="FILE", help="baseline from 'autoprune train'"),
    arg("--model", metavar="NAME", help="without --checkpoint: train (and cache) this baseline"),
    *data_args(required=False),
)
"""The baseline: a checkpoint, or a model name and data to train and cache one."""

BASELINE_AND_BUDGET = (
    *BASELINE,
    arg("--flops", metavar="V", help="FLOPs that remain: 50%%, 0.5 or 62M"),
    arg("--params", metavar="V", help="parameters that remain: 50%% or 1.2M"),
)
"""The baseline (a checkpoint, or a model name and data to train and cache one) and one budget."""

BUDGETS = (
    arg("--flops", nargs="+", metavar="V", help="FLOPs budgets, e.g. 70%% 50%% 30%%"),
    arg("--params", nargs="+", metavar="V", help="params budgets, e.g. 60%% 40%%"),
)
"""Several budgets of one kind (compare, fidelity); :func:`budgets_of` parses them."""

FINETUNE = (
    arg("--epochs", type=NONNEG_INT, default=5, help="fine-tuning epochs of the pruned model (default 5)"),
    arg("--lr", type=LR, default=0.01, help="fine-tuning learning rate (default 0.01)"),
    arg("--distill", action="store_true", help="fine-tune with distillation from the dense model"),
    arg("--baseline-epochs", type=POS_INT, default=30, help="epochs when training the baseline (default 30)"),
    arg("--calib-images", type=POS_INT, default=512,
        help="calibration images (default 512; di compares classes, so needs at least 2)"),
    SEED,
)
"""Fine-tuning, baseline training, calibration and seed options shared by prune and search."""


# --------------------------------------------------------------------------- edge parsers


def budget_of(args: argparse.Namespace) -> "Budget":
    """--flops 50% / --params 1.2M as a :class:`~autoprune.budget.Budget` (exactly one of
    them), parsed here, once (BudgetError if malformed), before any long work starts."""
    if (args.flops is None) == (args.params is None):
        raise UsageError("give exactly one budget: --flops VALUE or --params VALUE (e.g. --flops 50%)")
    kind, value = ("flops", args.flops) if args.flops is not None else ("params", args.params)
    return parse_budget(f"{kind}<={value}")


def budgets_of(args: argparse.Namespace) -> "list[Budget]":
    """--flops 70% 50% / --params 60% 40% (:data:`BUDGETS`) as Budgets, each parsed once, here."""
    if (args.flops is None) == (args.params is None):
        raise UsageError("give budgets with exactly one of --flops or --params (e.g. --flops 70% 50% 30%)")
    kind, values = ("flops", args.flops) if args.flops else ("params", args.params)
    return [parse_budget(f"{kind}<={v}") for v in values]


def parse_budget(text: str) -> "Budget":
    """``text`` (e.g. ``flops<=50%``) as a checked Budget (BudgetError if malformed)."""
    from .budget import Budget
    return Budget.parse(text)


def parse_criterion(text: str | None) -> dict[str, float] | None:
    """--criterion 'di' or a mix 'di:0.6,hpse:0.4' as checked weights (None: the method's default)."""
    from .criteria import parse_mix

    if text is None:
        return None
    try:
        return parse_mix(text)
    except AutopruneError as exc:
        raise type(exc)(f"--criterion: {exc}") from None


def writable_file(out: str) -> Path:
    """The --out file path, checked writable (its folder created) before any long work starts:
    not a folder, and a file can be created beside it."""
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {short(out)} is a folder; give a file path, e.g. {Path(out) / 'base.pt'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.autoprune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise AutopruneError(f"cannot write --out {short(out)}: {exc.strerror or exc}") from None
    return path


def writable_dir(out: str) -> Path:
    """The --out folder, created and checked writable before any long work starts."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".autoprune-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise AutopruneError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return path

