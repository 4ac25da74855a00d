"""Small caption corpora for the integration tests: every format, bad rows, one corrupt file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ["cat", "castle", "astronaut", "horse", "river", "mona lisa", "portrait", "sunset", "robot", "forest"]


def captions(prefix: str, n: int) -> list[str]:
    return [f"{prefix} {WORDS[i % len(WORDS)]} number {i % 7}" for i in range(n)]


def write_corpus(root: Path) -> dict[str, list]:
    """Every format, with bad rows, plus one corrupt file. Returns {file name: captions as written (None = bad)}."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, list] = {}
    a = [*captions("a photo of a", 18), None, "   "]
    pq.write_table(pa.table({"caption": a}), root / "a.parquet", row_group_size=7)
    expected["a.parquet"] = a
    b = captions("a painting of a", 12)
    lines = [json.dumps({"caption": c}) for c in b] + ["{broken json", json.dumps({"caption": 42})]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    expected["b.jsonl"] = [*b, None, None]
    c = captions("a drawing of a", 9)
    (root / "c.csv").write_text("caption,n\n" + "".join(f'"{x}",{i}\n' for i, x in enumerate(c)))
    expected["c.csv"] = c
    d = captions("a sketch of a", 6)
    (root / "d.tsv").write_text("caption\tn\n" + "".join(f"{x}\t{i}\n" for i, x in enumerate(d)))
    expected["d.tsv"] = d
    e = [*captions("a render of a", 5), ""]
    (root / "e.txt").write_text("\n".join(e) + "\n")
    expected["e.txt"] = e
    (root / "z_corrupt.parquet").write_bytes(b"PAR1 this is not a parquet file")
    return expected
