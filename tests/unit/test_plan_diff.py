"""Planning against the ledger with thousands of files: one pass, no Ray, no file opened."""

from __future__ import annotations

from auditor.io.inputs import InputFile
from auditor.io.ledger import DONE, FAILED
from auditor.pipeline.plan import diff_against_ledger

FINGERPRINT, UNIT_ROWS = "fp", 1000


def file(i: int, identity: str = "size=10;mtime=1") -> InputFile:
    source = f"s3://bucket/captions/part-{i:06d}.parquet"
    return InputFile(source, source[5:], "parquet", f"part-{i:06d}.parquet", f"part-{i:06d}-x", identity)


def record(f: InputFile, unit: int, units: int, status: str = DONE, **changes) -> dict:
    return {"source": f.source, "shard": f.shard, "unit": unit, "file_units": units, "status": status,
            "identity": f.identity, "fingerprint": FINGERPRINT, "unit_rows": UNIT_ROWS, **changes}  # fmt: skip


def test_diff_of_thousands_of_files_in_one_pass():
    n = 20_000
    files = [file(i) for i in range(n)]
    entries: dict[tuple[str, int], dict] = {}

    def put(r: dict) -> None:
        entries[(r["source"], r["unit"])] = r

    kinds = {}
    for i, f in enumerate(files):
        kind = ("complete", "partial", "failed", "changed", "other_options", "new")[i % 6]
        kinds[f.source] = kind
        if kind == "complete":
            for unit in range(3):
                put(record(f, unit, 3))
        elif kind == "partial":
            put(record(f, 0, 3))
            put(record(f, 2, 3))
        elif kind == "failed":
            put(record(f, 0, 2))
            put(record(f, 1, 2, FAILED))
        elif kind == "changed":  # the file was rewritten since: another size/mtime
            put(record(f, 0, 1, identity="size=9;mtime=0"))
        elif kind == "other_options":
            put(record(f, 0, 1, fingerprint="another model"))
            put(record(f, 1, 2, unit_rows=5))
    pending, skipped, fresh, valid, stale = diff_against_ledger(
        files, entries, FINGERPRINT, UNIT_ROWS, force=False
    )

    assert {kinds[f.source] for f in skipped} == {"complete"} and len(skipped) == -(-n // 6)
    done_units = {item.file.source: item.done_units for item in pending}
    assert len(pending) == n - len(skipped)
    for source, done in done_units.items():
        expected = {"partial": {0, 2}, "failed": {0}}.get(kinds[source], set())
        assert done == frozenset(expected), (kinds[source], done)
    assert {kinds[f.source] for f in fresh} == {"changed", "other_options", "new"}
    assert {kinds[s] for s in stale} == {"changed", "other_options"}
    assert all(r["identity"] == "size=10;mtime=1" for records in valid.values() for r in records)
    # --force: everything pending and fresh, nothing skipped.
    pending, skipped, fresh, _, _ = diff_against_ledger(files, entries, FINGERPRINT, UNIT_ROWS, force=True)
    assert len(pending) == len(fresh) == n and skipped == []
