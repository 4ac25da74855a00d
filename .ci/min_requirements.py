"""Print pip requirements that pin every dependency of pyproject.toml to its declared lower bound (`>=X` -> `==X`).

The lower-bounds check (.ci/lower_bounds.sh) installs exactly these, so it tests the ranges as they are declared and
cannot drift from them. Usage: python3 .ci/min_requirements.py [EXTRA ...] [--override 'torch==2.13.0' ...]
An extra's requirements are pinned the same way; an --override replaces the requirement of the same name (torch:
the CPU wheel this machine ships). A requirement without a lower bound fails here: a range that promises nothing
cannot be checked, so give it one in pyproject.toml.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare interpreter: pip vendors packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
try:
    import tomllib
except ImportError:  # Python 3.10: pip vendors tomli
    from pip._vendor import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pin_lower_bound(spec: str) -> str:
    """'ray[data,default]>=2.50' -> 'ray[data,default]==2.50'; the environment marker is kept."""
    req = Requirement(spec)
    lower = [s.version for s in req.specifier if s.operator == ">="]
    if len(lower) != 1:
        raise SystemExit(
            f"pyproject.toml: requirement {spec!r} has {len(lower)} lower bounds (`>=`); the lower-bounds check "
            "needs exactly one. Give it one, e.g. 'name>=X'."
        )
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}=={lower[0]}{marker}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="optional-dependency groups to pin too (e.g. test)")
    parser.add_argument(
        "--override", action="append", default=[], help="a requirement that replaces its name's"
    )
    parser.add_argument("--only", action="append", default=[], help="of the extras, keep only these names")
    args = parser.parse_args(argv)
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    specs = list(project["dependencies"])
    only = {canonicalize_name(name) for name in args.only}
    for extra in args.extras:
        for spec in project["optional-dependencies"][extra]:
            if not only or canonicalize_name(Requirement(spec).name) in only:
                specs.append(spec)
    overrides = {canonicalize_name(Requirement(o).name): o for o in args.override}
    for spec in specs:
        name = canonicalize_name(Requirement(spec).name)
        print(overrides.pop(name) if name in overrides else pin_lower_bound(spec))
    if overrides:
        raise SystemExit(f"--override names no requirement of pyproject.toml: {', '.join(overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
