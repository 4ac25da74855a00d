"""The toy model shipped inside the package: `auditor toy-model build DIR --preset full --seed 0`, built once and
checked in (about 4.6 MB of safetensors, configs, tokenizer and manifest), so the demo and the docs start at once.

`shipped_model_dir()` is the folder (a diffusers Stable Diffusion folder with `toy_manifest.json`); `shipped.json`
beside it records how it was built (torch version, CPU capability, sha256 of every file). `auditor toy-model build`
still trains from scratch; the slow test `tests/unit/test_toy_shipped.py` rebuilds it and compares.

python -m auditor.toy.shipped --rebuild    retrain and replace the shipped folder (after a recipe change)
Imports torch only through `auditor.toy.train`, when rebuilding.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from auditor.errors import ModelLoadError

SHIPPED_PRESET = "full"
SHIPPED_SEED = 0
SHIPPED_DIR = Path(__file__).parent / "weights" / f"{SHIPPED_PRESET}-seed{SHIPPED_SEED}"
# The flow-matching (SD3-shaped) toy, `auditor toy-model build DIR --family sd3 --preset full --seed 0`: 2.8 MB.
SHIPPED_DIRS = {
    "sd": SHIPPED_DIR,
    "sd3": Path(__file__).parent / "weights" / f"sd3-{SHIPPED_PRESET}-seed{SHIPPED_SEED}",
}
RECORD_FILE = "shipped.json"
# Files whose bytes depend on the build's timing, not on what was trained.
VOLATILE_FILES = frozenset({"toy_build.json", RECORD_FILE})

logger = logging.getLogger(__name__)


def shipped_model_dir(family: str = "sd") -> Path:
    """The shipped toy model folder of `family` ("sd", or "sd3" for the flow-matching toy). Raises ModelLoadError
    when the package was installed without it.
    """
    folder = SHIPPED_DIRS[family]
    if not (folder / "model_index.json").is_file():
        family_flag = "" if family == "sd" else f" --family {family}"
        raise ModelLoadError(
            f"the shipped toy model is missing from {folder} (an install without package data?). Reinstall "
            f"auditor, or build one with `auditor toy-model build DIR{family_flag}` and pass --model DIR."
        )
    return folder


def file_digests(model_dir: str | Path) -> dict[str, str]:
    """sha256 of every file under `model_dir` that training determines (relative POSIX path -> hex digest)."""
    root = Path(model_dir)
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in VOLATILE_FILES
    }


def read_shipped_record(model_dir: str | Path = SHIPPED_DIR) -> dict[str, Any]:
    return json.loads((Path(model_dir) / RECORD_FILE).read_text(encoding="utf-8"))


def build_environment() -> dict[str, str]:
    """What decides whether a rebuild can be bitwise identical: same torch build, same CPU kernel family."""
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
    }


def write_shipped_record(model_dir: str | Path, family: str = "sd") -> Path:
    record = {
        "family": family,
        "preset": SHIPPED_PRESET,
        "seed": SHIPPED_SEED,
        "built_with": build_environment(),
        "python": platform.python_version(),
        "files": file_digests(model_dir),
    }
    path = Path(model_dir) / RECORD_FILE
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def rebuild_shipped(target: Path = SHIPPED_DIR) -> Path:
    """Train the shipped preset from scratch (about 9 min of one core on a 2-core AVX2 machine) and replace `target`
    with it."""
    from auditor.toy.train import build_toy_model

    with tempfile.TemporaryDirectory(prefix="toy-shipped-") as scratch:
        built, _ = build_toy_model(Path(scratch) / "model", SHIPPED_PRESET, seed=SHIPPED_SEED)
        write_shipped_record(built)
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(built, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m auditor.toy.shipped", description=__doc__.splitlines()[0], allow_abbrev=False
    )
    parser.add_argument("--rebuild", action="store_true", help="retrain and replace the shipped model folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rebuild:
        print(f"rebuilt: {rebuild_shipped()}")
    else:
        print(shipped_model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
