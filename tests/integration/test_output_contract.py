"""The output contract: compressed inputs score like plain ones, every output file has exactly README's columns and
types (no internal column), and the readers users have (pyarrow, DuckDB, polars, Ray Data) see the same rows and
types, `shard` a string everywhere.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from audit_corpus import captions

from auditor import schema
from auditor.config import AuditConfig
from auditor.io.inputs import list_inputs
from auditor.io.parquet import FLAGGED_DIR, SCORES_DIR

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
KEEP_PLACEHOLDER = "<keep-columns>"


def readme_columns(heading: str) -> list[tuple[str, str, bool]]:
    """(column, type, nullable) rows of the README table under `#### <heading>`, in order."""
    text = README.read_text()
    start = text.index(f"#### {heading}\n")
    rows = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[1], cells[2] != "never"))
    assert rows, f"no column table under '#### {heading}' in README.md"
    return rows


def arrow_type(name: str) -> pa.DataType:
    """README's type names: pyarrow aliases (string, float32, int64, ...) and list<alias>."""
    inner = re.fullmatch(r"list<(\w+)>", name)
    return pa.list_(pa.type_for_alias(inner.group(1))) if inner else pa.type_for_alias(name)


def expected_schema(heading: str, keep: dict[str, pa.DataType], explain: bool) -> pa.Schema:
    """The file schema README promises (the partition column is a folder name, not in the files)."""
    fields = []
    for name, type_name, nullable in readme_columns(heading):
        if name == schema.SHARD:
            continue
        if name == KEEP_PLACEHOLDER:
            fields += [pa.field(k, t) for k, t in keep.items()]
        elif name in schema.FLAGGED_SCHEMA_EXTRA and not explain:
            continue
        else:
            fields.append(pa.field(name, arrow_type(type_name), nullable=nullable))
    return pa.schema(fields)


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        try:
            from compression import zstd
        except ImportError:
            from backports import zstd
        return zstd.compress(data)
    return {"gzip": gzip.compress, "bz2": bz2.compress}[codec](data)


TEXTS = captions("a photo of a", 12)


@pytest.fixture(scope="module")
def compressed_audit(ray_local, tmp_path_factory, micro_model_dir, micro_scorer):
    """One audit of the same captions as .jsonl, .jsonl.gz, .csv.gz, .txt.bz2 and .json.zst, plus a truncated
    .jsonl.gz; no --keep-columns, no --explain-flagged."""
    from auditor.pipeline.audit import run

    root = tmp_path_factory.mktemp("compressed")
    inputs = root / "in"
    inputs.mkdir()
    jsonl = "".join(json.dumps({"caption": c}) + "\n" for c in TEXTS).encode()
    (inputs / "a.jsonl").write_bytes(jsonl)
    (inputs / "b.jsonl.gz").write_bytes(compress(jsonl, "gzip"))
    csv = ("caption\n" + "".join(f'"{c}"\n' for c in TEXTS)).encode()
    (inputs / "c.csv.gz").write_bytes(compress(csv, "gzip"))
    (inputs / "d.txt.bz2").write_bytes(compress("".join(f"{c}\n" for c in TEXTS).encode(), "bz2"))
    (inputs / "e.json.zst").write_bytes(compress(jsonl, "zstd"))
    cut = compress(jsonl * 40, "gzip")
    (inputs / "z_cut.jsonl.gz").write_bytes(cut[: len(cut) // 2])
    threshold = float(np.median(micro_scorer.score(TEXTS)))
    cfg = AuditConfig(
        inputs=(str(inputs),), output=str(root / "out"), model=str(micro_model_dir), threshold=threshold,
        dtype="fp32", batch_size=8, quiet=True, report=False,
    )  # fmt: skip
    return cfg, run(cfg), {}, False


@pytest.fixture(scope="module")
def explained_audit(ray_local, tmp_path_factory, micro_model_dir, micro_scorer):
    """One audit with --id-column, --keep-columns and --explain-flagged of one file whose shard key, without the
    guard in shard_key, would be `1e-<10 digits>`: a float to polars' hive inference."""
    from auditor.pipeline.audit import run

    root = tmp_path_factory.mktemp("explained")
    path = next(
        p
        for p in (root / f"d{i}" / "1e.jsonl" for i in range(100_000))
        if hashlib.sha1(str(p).encode()).hexdigest()[:10].isdigit()
    )
    path.parent.mkdir()
    texts = TEXTS[:10]
    path.write_text(
        "".join(
            json.dumps({"key": f"k{i}", "caption": c, "url": f"u{i}"}) + "\n" for i, c in enumerate(texts)
        )
    )
    [listed] = list_inputs((str(path),), None, {})
    assert listed.shard.startswith("1e-h")
    cfg = AuditConfig(
        inputs=(str(path),), output=str(root / "out"), model=str(micro_model_dir), id_column="key",
        keep_columns=("url",), explain_flagged=True, threshold=float(np.median(micro_scorer.score(texts))),
        dtype="fp32", batch_size=8, quiet=True, report=False,
    )  # fmt: skip
    return cfg, run(cfg), {"url": pa.string()}, True


def read_hive(output: str, table: str) -> pa.Table:
    return pads.dataset(f"{output}/{table}", format="parquet", partitioning="hive").to_table()


def test_compressed_inputs_give_the_same_rows_and_scores(compressed_audit):
    cfg, result, _, _ = compressed_audit
    scores = read_hive(cfg.output, SCORES_DIR).to_pylist()
    by_file: dict[str, list[tuple]] = {}
    for r in sorted(scores, key=lambda r: (r[schema.SOURCE], r[schema.ROW])):
        by_file.setdefault(Path(r[schema.SOURCE]).name, []).append(
            (r[schema.ROW], r[schema.CAPTION], r[schema.SCORE], r[schema.FLAGGED], r[schema.STATUS])
        )
    assert sorted(by_file) == ["a.jsonl", "b.jsonl.gz", "c.csv.gz", "d.txt.bz2", "e.json.zst"]
    plain = by_file["a.jsonl"]
    assert [row for row, *_ in plain] == list(range(len(TEXTS))) and [c for _, c, *_ in plain] == TEXTS
    assert all(status == schema.OK for *_, status in plain) and any(f for *_, f, _ in plain)
    for name, rows in by_file.items():
        assert rows == plain, name


def test_a_truncated_archive_fails_its_file_alone(compressed_audit):
    cfg, result, _, _ = compressed_audit
    cut = str(Path(cfg.inputs[0]) / "z_cut.jsonl.gz")
    assert result.exit_code == 1 and list(result.failed) == [cut]
    assert re.search(
        r"z_cut\.jsonl\.gz cannot be decompressed as gzip \(EOFError.*truncated", result.failed[cut]
    )
    assert result.counts["rows"] == 5 * len(TEXTS)  # the other files, whole
    assert not any(
        Path(r).name == "z_cut.jsonl.gz" for r in read_hive(cfg.output, SCORES_DIR)["source"].to_pylist()
    )
    audit = json.loads((Path(cfg.output) / schema.AUDIT_FILE).read_text())
    assert audit["files"]["failed"][0]["source"] == cut


@pytest.mark.parametrize("audit", ["compressed_audit", "explained_audit"])
def test_every_output_file_has_readmes_columns_exactly(audit, request):
    cfg, result, keep, explain = request.getfixturevalue(audit)
    for table, heading, extra in (
        (SCORES_DIR, "Columns of scores/", keep),
        (FLAGGED_DIR, "Columns of flagged/", {}),
    ):
        want = expected_schema(heading, extra, explain)
        parts = sorted(Path(cfg.output, table).glob("shard=*/*.parquet"))
        assert parts, f"no {table} files"
        for part in parts:
            got = pq.read_schema(part).remove_metadata()
            assert got.equals(want), f"{part}:\n{got}\n!= README's\n{want}"
        assert readme_columns(heading)[-1][:2] == (schema.SHARD, "string")
    # Throughput (per node on a cluster) is in _audit.json; the node column it is counted from is in no file.
    assert json.loads((Path(cfg.output) / schema.AUDIT_FILE).read_text())["throughput"]["rows"] > 0
    assert not any(
        schema.NODE in pq.read_schema(p).names for p in Path(cfg.output).glob("*/shard=*/*.parquet")
    )


def normalised(table: pa.Table) -> pa.Table:
    """Readers differ only in string and list widths and in column order: compare on pyarrow's plain types."""

    def plain(t: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(t) or pa.types.is_string_view(t):
            return pa.string()
        if pa.types.is_large_list(t) or pa.types.is_list(t) or pa.types.is_list_view(t):
            return pa.list_(plain(t.value_type))
        if pa.types.is_dictionary(t):
            return plain(t.value_type)
        return t

    fields = sorted((pa.field(f.name, plain(f.type)) for f in table.schema), key=lambda f: f.name)
    table = table.select([f.name for f in fields]).cast(pa.schema(fields))
    return table.sort_by([(schema.SOURCE, "ascending"), (schema.ROW, "ascending")])


@pytest.mark.parametrize("audit", ["compressed_audit", "explained_audit"])
@pytest.mark.parametrize("table", [SCORES_DIR, FLAGGED_DIR])
def test_the_readers_users_have_see_the_same_rows_and_types(audit, table, request):
    import duckdb
    import polars as pl
    import ray

    cfg, _, _, _ = request.getfixturevalue(audit)
    root = f"{cfg.output}/{table}"
    seen = {
        "pyarrow": read_hive(cfg.output, table),
        "duckdb": duckdb.sql(
            f"SELECT * FROM read_parquet('{root}/*/*.parquet', hive_partitioning=true)"
        ).fetch_arrow_table(),
        "polars": pl.scan_parquet(f"{root}/", hive_partitioning=True).collect().to_arrow(),
        "ray": pa.concat_tables(ray.get(ray.data.read_parquet(root).to_arrow_refs())),
    }
    tables = {name: normalised(t) for name, t in seen.items()}
    for name, t in tables.items():
        assert t.schema.field(schema.SHARD).type == pa.string(), f"{name} reads shard as {t.schema}"
        assert t.schema.equals(tables["pyarrow"].schema), (
            f"{name}:\n{t.schema}\n!= pyarrow's\n{tables['pyarrow'].schema}"
        )
        assert t.to_pylist() == tables["pyarrow"].to_pylist(), name
    assert tables["pyarrow"].num_rows > 0


def test_filter_reads_compressed_inputs_too(compressed_audit):
    from auditor.config import FilterConfig
    from auditor.pipeline.filter import run_filter

    cfg, _, _, _ = compressed_audit
    clean = Path(cfg.output).parent / "clean"
    result = run_filter(
        FilterConfig(inputs=cfg.inputs, audit_output=cfg.output, output=str(clean), quiet=True)
    )
    flagged = sum(read_hive(cfg.output, SCORES_DIR)[schema.FLAGGED].to_pylist()) // 5  # per copy of TEXTS
    for name in ("a", "b", "c", "d", "e"):  # one parquet per input file, named without its extensions
        assert pq.read_table(clean / f"{name}.parquet").num_rows == len(TEXTS) - flagged, name
    by_file = {Path(f["source"]).name: f for f in result.files}
    assert not by_file["z_cut.jsonl.gz"]["audited"] and result.exit_code == 1  # no audit results: kept out
