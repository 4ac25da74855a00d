"""Planning time vs the number of input files: listing, reading the ledger and diffing against it (no Ray).

Run on an otherwise idle machine; paste the table into BENCHMARKS.md.

  python bench/planning.py [--files 10000 100000] [--quick]

For each size: N small local txt files (one caption each). "first run" plans against an empty output;
"rerun" plans against a full ledger, written the way a run leaves it (one record per unit through Ledger.mark,
then the end-of-run compaction). Also timed: reading the same ledger before compaction (a run killed before its
end leaves one object per unit) and the compaction itself. The model fingerprint is reported apart: it depends on
the model's size, not on the number of files.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def write_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"{i // 1000:04d}").mkdir(exist_ok=True)
        (folder / f"{i // 1000:04d}" / f"c{i:07d}.txt").write_text(f"a photo of caption {i}\n")


def plan_seconds(cfg) -> tuple[float, dict[str, float], int]:
    from auditor.pipeline.plan import plan_audit

    started = time.perf_counter()
    plan = plan_audit(cfg)
    total = time.perf_counter() - started
    return total - plan.timings_s["model_fingerprint"], plan.timings_s, len(plan.pending)


def fill_ledger(cfg) -> None:
    """Records for every file as a finished run writes them: one per unit as it commits, then compaction."""
    import fsspec

    from auditor.io.ledger import DONE, Ledger
    from auditor.pipeline.plan import plan_audit

    plan = plan_audit(cfg)
    ledger = Ledger(fsspec.filesystem("file"), cfg.output)
    for item in plan.pending:
        f = item.file
        ledger.mark(
            {"source": f.source, "shard": f.shard, "unit": 0, "first_row": 0, "rows": 1, "file_units": 1,
             "identity": f.identity, "fingerprint": plan.fingerprint, "unit_rows": cfg.unit_rows,
             "status": DONE, "counts": {"ok": 1, "flagged": 0}, "histogram": {"70": 1}, "parts": None,
             "error": None, "finished_at": "2026-11-30T00:00:00+00:00"}
        )  # fmt: skip


def parts(timings: dict[str, float]) -> str:
    return " / ".join(
        f"{timings[k]:.2f}" for k in ("list_inputs", "read_ledger", "diff_ledger", "check_columns")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--files", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument(
        "--quick", action="store_true", help="200 and 2000 files: a smoke run, not a measurement"
    )
    args = parser.parse_args()
    sizes = [200, 2000] if args.quick else args.files

    import fsspec

    from auditor.config import AuditConfig
    from auditor.io.ledger import Ledger
    from auditor.toy.models import TINY, build_random_sd

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_random_sd(Path(tmp) / "model", TINY, seed=0)
        for n in sizes:
            root = Path(tmp) / f"n{n}"
            started = time.perf_counter()
            write_files(root / "in", n)
            made = time.perf_counter() - started
            cfg = AuditConfig(inputs=(str(root / "in"),), output=str(root / "out"), model=str(model))
            first, first_parts, pending = plan_seconds(cfg)
            assert pending == n
            fill_ledger(cfg)
            ledger = Ledger(fsspec.filesystem("file"), cfg.output)
            started = time.perf_counter()
            assert len(ledger.entries()) == n
            uncompacted = time.perf_counter() - started
            started = time.perf_counter()
            ledger.compact()
            compaction = time.perf_counter() - started
            rerun, rerun_parts, pending = plan_seconds(cfg)
            assert pending == 0
            rows.append((n, made, first, first_parts, uncompacted, compaction, rerun, rerun_parts))

    print(f"\nplanning time, {platform.node()} ({os.cpu_count()} CPUs), python {platform.python_version()}")
    print(
        "| files | first run (s) | list / ledger / diff / columns | rerun, full ledger (s) | list / ledger / diff "
        "| read 1 record per unit (s) | compaction (s) | model fingerprint (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n, _, first, fp, uncompacted, compaction, rerun, rp in rows:
        print(f"| {n} | {first:.2f} | {parts(fp)} | {rerun:.2f} | {parts(rp)} | {uncompacted:.2f} | {compaction:.2f} "
              f"| {fp['model_fingerprint']:.2f} |")  # fmt: skip
    if len(rows) >= 2:
        (n0, *_, r0, _), (n1, *_, r1, _) = rows[0], rows[-1]
        f0, f1 = rows[0][2], rows[-1][2]
        print(f"\n{n1 // n0}x the files: first run {f1 / f0:.1f}x the time, rerun {r1 / r0:.1f}x the time")


if __name__ == "__main__":
    main()
