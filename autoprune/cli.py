"""The ``autoprune`` command line: a thin layer over the Python API.

Each subcommand is one function in :mod:`autoprune.commands`, registered with
:func:`autoprune.cli_args.command`, which names its arguments; :func:`main` parses,
dispatches and turns every user error into one line ``autoprune: error: ...`` on stderr
with exit status 2 (130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from . import commands  # noqa: F401 - registers the subcommands in COMMANDS
from .cli_args import COMMANDS, Later, UsageError
from .errors import AutopruneError

PROG = "autoprune"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D102 - argparse hook
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Budgeted structured pruning of CNNs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        sub = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for flags, kwargs in cmd.arguments:
            sub.add_argument(*flags, **{k: v.make() if isinstance(v, Later) else v for k, v in kwargs.items()})
        sub.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args) or 0)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except AutopruneError as exc:
        return _fail(str(exc))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}")
    except (MemoryError, torch.OutOfMemoryError) as exc:  # a size no check foresaw
        return _fail(f"out of memory ({type(exc).__name__}); use a smaller --image-size, "
                     "--batch-size or model")
    except RuntimeError as exc:
        if "can't allocate memory" not in str(exc):
            raise
        return _fail("out of memory (the CPU allocator refused); use a smaller --image-size, "
                     "--batch-size or model")


def _fail(message: str, limit: int = 400) -> int:
    """Print ``message`` as one line (long lists, e.g. of state_dict keys, shortened)."""
    line = "; ".join(part.strip() for part in message.splitlines() if part.strip())
    if len(line) > limit:
        line = f"{line[:limit - 30].rstrip()} ... ({len(line) - limit + 30} more characters)"
    print(f"{PROG}: error: {line or 'failed'}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
