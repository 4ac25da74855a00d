"""constraints.txt, the versions CI tested, covers what pyproject.toml asks for, and the image and `make install`
install through it (README, Versions tested)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[2]
CONSTRAINTS = ROOT / "constraints.txt"
LEFT_OUT = {"torch"}  # the image's or make install's TORCH (.ci/constraints.py)


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            found[canonicalize_name(name)] = version
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(s) for s in project["dependencies"] + project["optional-dependencies"]["test"]]


@pytest.mark.parametrize("req", [r for r in declared() if canonicalize_name(r.name) not in LEFT_OUT], ids=str)
def test_every_requirement_is_pinned_inside_its_range(req):
    pinned = pins().get(canonicalize_name(req.name))
    assert pinned is not None, (
        f"{req.name} is not in constraints.txt: run `make constraints` (README, Versions tested)"
    )
    assert req.specifier.contains(pinned, prereleases=True), (
        f"constraints.txt pins {req.name}=={pinned}, outside {req}"
    )


def test_one_pin_per_package_and_torch_left_to_the_image():
    names = [
        canonicalize_name(line.split("==")[0])
        for line in CONSTRAINTS.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(names) == len(set(names)) and not LEFT_OUT & set(names)


def test_the_product_does_not_ask_for_boto3():
    """No module imports it, and beside s3fs it made pip backtrack for minutes (README, Install); tests may."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "boto3" not in {canonicalize_name(Requirement(s).name) for s in project["dependencies"]}


def test_the_image_and_make_install_use_it():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    (install,) = [line for line in dockerfile.splitlines() if line.startswith("RUN pip install")]
    assert "-c constraints.txt" in install
    ray_pin = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', install).group(1)
    assert pins()["ray"] == ray_pin, "the image's Ray differs from the tested one"
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile and "-c $(CONSTRAINTS)" in makefile
