"""Model fingerprint time at an audit start: the first definition (every .json/.safetensors/.txt, read each time)
against the current one (only what scoring loads, per-file digests cached by file identity), first and second start.

  python bench/fingerprint.py [--gib 1] [--repeat 3]

Two folders, each a tiny random SD model plus one large file of random bytes:
  extra:  the large file is a root checkpoint (v1-5-pruned.safetensors), which scoring never loads;
  loaded: the large file is the UNet's weights (unet/diffusion_pytorch_model.safetensors), which it does.
The files are written once and left to settle (fingerprint.RACY_S) before any timing; the page cache is warm for
every column (the files were just written), so the times are hashing and cache look-ups, not disk reads.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def write_random(path: Path, gib: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(1 << 24)
    with path.open("wb") as fh:
        for _ in range(int(gib * (1 << 30)) // len(block)):
            fh.write(block)


def timed(fn, repeat: int) -> tuple[float, str]:
    best, value = float("inf"), ""
    for _ in range(repeat):
        started = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - started)
    return best, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--gib", type=float, default=1.0, help="size of the large file (GiB)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the repeatable columns")
    args = parser.parse_args(argv)

    from auditor.scoring import fingerprint as fp
    from auditor.toy.models import TINY, build_random_sd

    work = Path(tempfile.mkdtemp(prefix="auditor-bench-fingerprint-"))
    os.environ["AUDITOR_CACHE"] = str(work / "cache")
    try:
        clean = build_random_sd(work / "clean", TINY, seed=0)
        folders = {}
        for case, relative in (
            ("extra", "v1-5-pruned.safetensors"),
            ("loaded", "unet/diffusion_pytorch_model.safetensors"),
        ):
            folder = shutil.copytree(clean, work / case)
            write_random(folder / relative, args.gib)
            folders[case] = folder
        time.sleep(fp.RACY_S + 0.5)  # settled files only are cached
        print(
            f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, {args.gib} GiB file"
        )
        print(f"{'folder':8} {'first definition':>17} {'current, 1st start':>19} {'current, 2nd start':>19}")
        for case, folder in folders.items():
            # The first definition, uncached (as every audit start computed it before).
            old_s, _ = timed(lambda folder=folder: fp.legacy_digest(folder), args.repeat)
            shutil.rmtree(work / "cache", ignore_errors=True)
            first_s, first = timed(lambda folder=folder: fp.fingerprint_model(folder), 1)
            second_s, second = timed(lambda folder=folder: fp.fingerprint_model(folder), args.repeat)
            assert first == second
            print(f"{case:8} {old_s:16.3f}s {first_s:18.3f}s {second_s:18.4f}s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
