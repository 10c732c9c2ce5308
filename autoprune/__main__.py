"""The ``autoprune`` console script (and ``python -m autoprune``).

A Ctrl-C is answered with one line and exit status 130 wherever it lands, also while
torch and the rest are still being imported: nothing heavy is imported before the
``try`` below (the package ``__init__`` is lazy), and :func:`autoprune.cli.main`
handles the rest. Library messages (logger ``autoprune``, level INFO, e.g. "replacing
the model in OUT") go to stderr as ``autoprune: ...`` lines.
"""

import sys

PROG = "autoprune"
EXIT_INTERRUPTED = 130


def main(argv=None) -> int:
    """Run the command line (see :func:`autoprune.cli.main`); 130 on Ctrl-C, even during imports."""
    try:
        _log_to_stderr()
        from .cli import main as run

        return run(argv)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED


def _log_to_stderr() -> None:
    import logging

    logger = logging.getLogger(PROG)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
