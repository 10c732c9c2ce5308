"""Write constraints.txt: the exact versions of autoprune's dependency closure installed here.

Run it in the environment where the whole suite (``.ci/run``) just passed::

    python tools/freeze_constraints.py            # rewrites constraints.txt
    python tools/freeze_constraints.py --check    # exit 1 if constraints.txt differs

The closure starts from the project's requirements in ``pyproject.toml`` (the base
dependencies plus the ``dev`` extra, and ``peers`` where installed) and follows each
installed distribution's own requirements (markers evaluated for this interpreter), so
packages that merely happen to be installed here are left out. Pins are written as
``name==version``, sorted, with a header naming the Python and platform they were
resolved on: a constraints file is a statement about one tested environment.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "peers")


def _top_level(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project.get("dependencies", [])]
    for extra in EXTRAS:
        reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    return reqs


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """Canonical name → installed version for every installed package ``requirements`` reach."""
    env = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}
    todo = [(r, tuple(sorted(r.extras))) for r in requirements]
    pins: dict[str, str] = {}
    seen: set[tuple[str, tuple]] = set()
    while todo:
        req, extras = todo.pop()
        name = canonicalize_name(req.name)
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional extra that is not installed here
        pins[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = [{**env, "extra": e} for e in extras] or [{**env, "extra": ""}]
            if sub.marker is None or any(sub.marker.evaluate(w) for w in wanted):
                todo.append((sub, tuple(sorted(sub.extras))))
    pins.pop("autoprune", None)
    return dict(sorted(pins.items()))


def render(pins: dict[str, str]) -> str:
    head = (f"# Exact versions the autoprune suite last passed with (python {platform.python_version()}, "
            f"{sys.platform} {platform.machine()}).\n"
            "# Install with: pip install -c constraints.txt -e \".[dev,peers]\"\n"
            "# Refresh after a green .ci/run: python tools/freeze_constraints.py (see README, Dependencies).\n")
    return head + "".join(f"{name}=={version}\n" for name, version in pins.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with constraints.txt instead of writing")
    parser.add_argument("--out", type=Path, default=ROOT / "constraints.txt")
    args = parser.parse_args(argv)
    text = render(closure(_top_level(ROOT / "pyproject.toml")))
    if args.check:
        old = args.out.read_text() if args.out.exists() else ""
        strip = lambda t: [line for line in t.splitlines() if not re.match(r"\s*#", line)]  # noqa: E731
        same = strip(old) == strip(text)
        print("constraints.txt matches this environment" if same else
              "constraints.txt differs from this environment; run python tools/freeze_constraints.py")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
