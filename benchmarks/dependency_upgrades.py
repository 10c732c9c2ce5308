"""Would the newest releases of our dependencies pass? An upgrade is a decision, not a surprise.

Builds a fresh virtual environment **without** ``constraints.txt`` (so pip resolves the
newest releases inside ``pyproject.toml``'s bounds — or beyond them with ``--unbounded``),
runs the search tests there (the part of the suite most exposed to Optuna and Ray
changes; ``--tests`` for others), and prints, per package whose resolved version differs
from ``constraints.txt``, the pinned and the newest version, then whether the tests passed.

    python benchmarks/dependency_upgrades.py                  # newest within our bounds
    python benchmarks/dependency_upgrades.py --unbounded      # newest, bounds lifted too
    python benchmarks/dependency_upgrades.py --venv /tmp/up   # reuse/keep the venv

Not a CI test: it needs the package index and takes minutes (torch alone is ~5 GB in a
venv). torch/torchvision are taken as pinned (``--torch-from-constraints``, the default),
because this machine can only install the releases that lie on its disk. When the tests
pass, adopting the upgrade is: install it here, run ``.ci/run``, then
``python tools/freeze_constraints.py`` and commit ``constraints.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED_FIRST = ("torch", "torchvision")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, text=True, **kw)


def _unbounded_requirements() -> list[str]:
    """pyproject's requirements with every version bound dropped (names and extras kept)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    return [re.split(r"[<>=!~;]", r, maxsplit=1)[0].strip() for r in reqs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, help="venv folder to create or reuse (default: a temporary one)")
    parser.add_argument("--unbounded", action="store_true", help="also lift pyproject's upper bounds")
    parser.add_argument("--tests", default="tests/test_search.py", help="pytest target (default the search tests)")
    args = parser.parse_args(argv)

    pins = _pins(ROOT / "constraints.txt")
    venv = args.venv or Path(tempfile.mkdtemp(prefix="autoprune-upgrade-"))
    py = venv / "bin" / "python"
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    _run(pip + [f"{name}=={pins[name]}" for name in PINNED_FIRST if name in pins], check=True)
    _run(pip + ["-U", "-e", f"{ROOT}[dev]"], check=True)
    if args.unbounded:
        _run(pip + ["-U"] + _unbounded_requirements(), check=True)

    frozen = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], text=True,
                            capture_output=True, check=True).stdout
    got = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(frozen)}
    env = dict(os.environ, RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1")
    start = time.time()
    test = _run([str(py), "-m", "pytest", "--runslow", "-q", "-p", "no:cacheprovider", args.tests],
                cwd=ROOT, env=env)
    minutes = (time.time() - start) / 60

    changed = [(n, pins[n], got[n]) for n in sorted(pins) if n in got and got[n] != pins[n]]
    print(f"\n{'package':<28}{'constraints.txt':>18}{'newest resolved':>18}")
    for name, old, new in changed:
        print(f"{name:<28}{old:>18}{new:>18}")
    if not changed:
        print("(every package resolved to its constraints.txt version)")
    verdict = "PASS" if test.returncode == 0 else f"FAIL (pytest exit {test.returncode})"
    print(f"\n{args.tests} with the newest versions{' (bounds lifted)' if args.unbounded else ''}: "
          f"{verdict} in {minutes:.1f} min; venv {venv}")
    return 0 if test.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
